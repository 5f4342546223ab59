"""A study whose `--storage` is object storage (a real S3 server on 127.0.0.1: moto's standalone server, the `s3`
fixture of tests/study/conftest.py): the driver uploads each source's index once; a node with another cache downloads
it and maps it, building nothing."""

import os

import numpy as np

from pipelines import data
from pipelines.data import scan as index_scan


def _config(cache):
    from study.config import load_study

    return load_study("configs/smoke.yaml", [f"data.cache_dir={cache}"])


def test_a_node_downloads_the_stored_index_once_and_builds_none(s3, tmp_path, monkeypatch):
    from study.storage import Storage
    from study.trial import index_root, sync_indexes

    storage = Storage(s3)
    storage.write_bytes("created", b"")  # the bucket
    driver, node = _config(tmp_path / "driver-cache"), _config(tmp_path / "node-cache")
    src = driver.data.pretrain
    found = data.prepare(src, driver.cache_dir, index_root(driver, storage), progress=False)
    sync_indexes(driver, storage, src, found, upload=True)
    assert sorted(storage.list_dir("index")) == sorted([*(os.path.basename(f) for f in found.indexes.values()),
                                                         "prepared"])

    def refuse(*args, **kwargs):
        raise AssertionError("a node built an index")

    monkeypatch.setattr(index_scan, "build", refuse)
    sync_indexes(node, storage, src)  # what a trial does first, on its node
    here = data.prepared(src, node.cache_dir, index_root(node, storage))
    assert all(str(tmp_path / "node-cache") in f for f in here.indexes.values())
    subset = data.nested_subset(here.index(), 64, seed=0)
    ours = data.load(subset, 32)
    theirs = data.load(data.nested_subset(found.index(), 64, seed=0), 32)
    assert ours.keys == theirs.keys and np.array_equal(ours.images, theirs.images)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "node-cache" / "index").rglob("*") if p.is_file()}
    sync_indexes(node, storage, src)  # a second trial on that node: nothing downloaded again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
