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


def test_a_node_takes_the_index_of_rewritten_shards_and_never_a_record_without_its_folders(s3, tmp_path):
    """A node that read the shards before they were rewritten (same names, other labels) takes the driver's new
    record and index at its next trial (it kept its own record and read stale labels before); and a download cut
    short leaves no record on the node, so the next trial downloads again instead of failing on a half index."""
    import types

    import pytest

    from pipelines.data.writer import write_shard
    from study.storage import Storage
    from study.trial import index_root, sync_indexes

    def shards(labels: int) -> None:
        rng = np.random.default_rng(labels)
        (tmp_path / "shards").mkdir(exist_ok=True)
        for s in range(2):
            write_shard(tmp_path / "shards" / f"train-{s}.tar",
                        [(f"{s}-{i}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), i % labels) for i in range(8)])

    storage = Storage(s3)
    storage.write_bytes("created", b"")
    driver, node = (types.SimpleNamespace(cache_dir=tmp_path / name) for name in ("driver-cache", "node-cache"))
    src = data.SourceConfig(source="webdataset", urls=f"{tmp_path}/shards/train-{{0..1}}.tar", size=16,
                            num_classes=4)

    def invocation():
        found = data.prepare(src, driver.cache_dir, index_root(driver, storage), progress=False)
        sync_indexes(driver, storage, src, found, upload=True)
        sync_indexes(node, storage, src)
        return found, data.prepared(src, node.cache_dir, index_root(node, storage))

    shards(4)
    found, here = invocation()
    assert here.index().label.tolist() == found.index().label.tolist() == [i % 4 for i in range(8)] * 2
    os.utime(tmp_path / "shards" / "train-0.tar", ns=(1, 1))  # rewritten: another identity, another index
    shards(3)
    found, here = invocation()
    assert os.path.basename(here.indexes["train"]) == os.path.basename(found.indexes["train"])
    assert here.index().label.tolist() == [i % 3 for i in range(8)] * 2

    fresh = types.SimpleNamespace(cache_dir=tmp_path / "fresh-node")
    real, calls = Storage.download_file, []

    def cut(self, rel, local):
        calls.append(rel)
        if len(calls) == 2:
            raise OSError("connection reset")
        return real(self, rel, local)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Storage, "download_file", cut)
        with pytest.raises(OSError, match="connection reset"):
            sync_indexes(fresh, storage, src)
    root = index_root(fresh, storage)
    assert not data.record_path(src, root).exists() and not (root / os.path.basename(found.indexes["train"])).exists()
    sync_indexes(fresh, storage, src)  # the next trial
    assert data.prepared(src, fresh.cache_dir, root).index().label.tolist() == [i % 3 for i in range(8)] * 2


def test_a_cut_upload_leaves_nothing_under_its_name_and_a_short_copy_is_replaced(s3, tmp_path, monkeypatch):
    """An upload that fails midway leaves no object under its name (closing the stream would complete it there);
    a stored index file whose size is not the local one is uploaded again by the driver, and a node's copy whose
    size is not the stored one is downloaded again (a name alone said "present")."""
    import pytest

    from study import storage as storage_module
    from study.storage import Storage
    from study.trial import index_root, sync_indexes

    storage = Storage(s3)
    storage.write_bytes("created", b"")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * storage_module.CHUNK))

    def cut(src, out, length):
        out.write(src.read(length))
        raise OSError("connection reset")

    class Undeletable:  # the clean-up after the failure fails too (the endpoint went away)
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def delete_file(self, path):
            raise OSError("endpoint gone")

    fs, storage.fs = storage.fs, Undeletable(storage.fs)
    with monkeypatch.context() as patch:
        patch.setattr(storage_module.shutil, "copyfileobj", cut)
        with pytest.raises(OSError, match="connection reset"):
            storage.upload_file(big, "index/x/big.bin")
    storage.fs = fs
    assert "big.bin" not in storage.sizes("index/x")  # at most a temporary object, which nothing reads
    storage.upload_file(big, "index/x/big.bin")
    assert storage.sizes("index/x")["big.bin"] == big.stat().st_size

    driver, node = _config(tmp_path / "driver-cache"), _config(tmp_path / "node-cache")
    src = driver.data.pretrain
    found = data.prepare(src, driver.cache_dir, index_root(driver, storage), progress=False)
    sync_indexes(driver, storage, src, found, upload=True)
    folder = os.path.basename(found.indexes["train"])
    name = next(n for n in storage.sizes(f"index/{folder}") if n != "meta.json")
    whole = (found.index().folder / name).read_bytes()
    storage.write_bytes(f"index/{folder}/{name}", whole[:10])  # what a cut upload of an older release left
    sync_indexes(driver, storage, src, found, upload=True)
    assert storage.read_bytes(f"index/{folder}/{name}") == whole
    sync_indexes(node, storage, src)
    mine = index_root(node, storage) / folder / name
    mine.write_bytes(whole[:10])  # a node's short copy
    sync_indexes(node, storage, src)
    assert mine.read_bytes() == whole
