"""Data changed in place under a finished study (real Ray, real MLflow, real tar shards on disk): test splits
rewritten (a downstream task's, the pretraining source's) are measured again without pretraining; training shards
touched are refused in one line, before any trial, and `--same-data` keeps the results. Before, every rerun reused
the results measured on the old files."""

import json
import shutil

import pytest

from pipelines import data
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def _shards(src: data.SourceConfig, cache, to):
    """The shapes source `src` generated, its shards copied to `to` (plain tar shards, as a user's)."""
    made = data.prepare(src, cache, progress=False)
    to.mkdir()
    for split in ("train", "test"):
        (shard,) = made.shards[split]
        shutil.copy(shard, to / f"{split}.tar")


def _record(out) -> dict:
    (path,) = (out / "smoke" / "storage" / "points").glob("*/record.json")
    return json.loads(path.read_text())


def test_changed_test_splits_are_measured_again_and_changed_training_data_refused(tmp_path, cache_dir, monkeypatch,
                                                                                    capsys):
    pre, task, other, other_pre = (tmp_path / name for name in ("pre", "task", "other", "other-pre"))
    upstream = dict(source="shapes", size=512, test_size=128, image_size=32, num_classes=16)
    _shards(data.SourceConfig(**upstream, seed=0), cache_dir, pre)
    _shards(data.SourceConfig(**upstream, seed=5), cache_dir, other_pre)
    novel = dict(source="shapes", size=160, test_size=160, image_size=48, num_classes=8)
    _shards(data.SourceConfig(**novel, seed=1), cache_dir, task)
    _shards(data.SourceConfig(**novel, seed=2), cache_dir, other)
    out = tmp_path / "runs"
    command = ["-m", "study.run", "--grid", "configs/smoke.yaml", "--out", str(out), "models=[ViT-Pico/4]",
               "data.subsets=[256]", "pretrain.steps=6", "evaluate.finetune=null", "evaluate.diagnostics=null",
               "data.pretrain.source=webdataset", f"data.pretrain.urls={pre}/train.tar",
               f"data.pretrain.test_urls={pre}/test.tar", "data.pretrain.size=512", "data.pretrain.test_size=128",
               "downstream[0].source=webdataset", f"downstream[0].urls={task}/train.tar",
               f"downstream[0].test_urls={task}/test.tar"]
    first = run_cli(command, cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    trained = _record(out)
    assert trained["data"] and trained["evals"]["fewshot/shapes-novel"]["data"]
    (started,) = (out / "smoke" / "storage" / "points").glob("*/data.json")  # what step 0 saw: a resume compares it
    assert json.loads(started.read_text()) == trained["data"] and set(trained["data"]) == {"pretrain", "upstream"}

    # The test splits rewritten (other images, the same keys): the task's, and the one the upstream top-1 is on.
    shutil.copy(other / "test.tar", task / "test.tar")
    shutil.copy(other_pre / "test.tar", pre / "test.tar")
    again = run_cli(command, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    resized, same_size = ("files added or removed, or their sizes or content tags changed",
                          "only modification times differ: a copy or a touch, or a rewrite of the same size")
    for source, did, how, what in (  # (the procedural images of this tar have one size whatever their pixels)
            ("data.pretrain (webdataset), its test split", "measured upstream top-1 on it", same_size,
             "it is measured again"),
            ("downstream[0] (shapes-novel)", "was evaluated on it", resized, "those evaluations run again")):
        assert (f"note: {source}: its files changed since 1 point of this study {did} ({how}); {what} (--same-data "
                "keeps the results if the content is the same)") in again.stdout, again.stdout
    assert "evaluate (upstream top-1, fewshot/shapes-novel" in again.stdout, again.stdout
    evaluated = _record(out)
    assert evaluated["data"]["pretrain"] == trained["data"]["pretrain"]  # not retrained
    assert evaluated["data"]["upstream"] != trained["data"]["upstream"] and evaluated["timings"]["upstream"] > 0
    assert {k: v for k, v in evaluated["pretrain"].items() if k != "val_top1"} == {
        k: v for k, v in trained["pretrain"].items() if k != "val_top1"}
    for kind in ("fewshot", "linear_probe"):  # run again (their seconds add up), on the task as it is now
        assert evaluated["timings"][kind] > trained["timings"][kind]
        assert evaluated["evals"][f"{kind}/shapes-novel"]["data"] != trained["evals"][f"{kind}/shapes-novel"]["data"]

    (pre / "train.tar").write_bytes((pre / "train.tar").read_bytes())  # the same bytes, a new modification time
    shutil.copy(other / "train.tar", task / "train.tar")  # and the task's train split rewritten
    from study.run import main  # in this process: refused after Ray starts, the ~8 s of a Python start saved

    monkeypatch.setenv("VITSCALE_CACHE", str(cache_dir))
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    code, refused = main(command[2:]), capsys.readouterr()
    assert code == 2 and refused.err.strip().splitlines() == [
        "error: data.pretrain (webdataset): its files changed since 1 point of this study trained on them (only "
        "modification times differ: a copy or a touch, or a rewrite of the same size); and downstream[0] "
        "(shapes-novel): its files changed since 1 point of this study was evaluated on them (files added or "
        "removed, or their sizes or content tags changed). Their results would stand for data they never saw: to "
        "train on these files beside them, give the study a new name (study=NAME); --fresh trains this study's "
        "points anew; --same-data keeps the results if the content is the same"], refused.err[-3000:]
    assert _record(out) == evaluated
    assert main([*command[2:], "--dry-run"]) == 0  # it keeps the point, and says it did not look at the data
    assert ("note: 1 finished point kept above: the dry run does not compare the data with what they were measured "
            "on (it prepares nothing); the run does, before any trial") in capsys.readouterr().out

    kept = run_cli([*command, "--same-data"], cache_dir)
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert "the 1 point is done" in kept.stdout and ("note: --same-data: the results of 1 point measured on "
                                                     "data.pretrain (webdataset), downstream[0] (shapes-novel) are "
                                                     "kept") in kept.stdout, kept.stdout
    restamped = _record(out)
    assert restamped["data"] != evaluated["data"] and restamped["timings"] == evaluated["timings"]
