"""A study whose `--storage` is a bucket on an S3 server (moto's standalone server on 127.0.0.1, the `s3_server`
fixture of tests/study/conftest.py), with its pretraining shards read from the same server: it runs, is SIGKILLed,
resumes, is extended, and no credential reaches what it wrote. Credentials come from the standard environment
variables only."""

import os
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipelines import data
from pipelines.config import UserError
from pipelines.data.writer import write_shard
from study.storage import PointFiles, Storage, redact
from tests.conftest import run_cli, start_cli, wait_until
from tests.study.conftest import SECRET

SHARDS = 4  # of 128 samples: 512 in all, 16 classes, 32x32 (what the smoke grid's pretraining source declares)


def _write_shards(folder) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(SHARDS):
        write_shard(folder / f"train-{s}.tar", ((f"{s}-{i:03d}", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                                                 i % 16) for i in range(128)))


@pytest.fixture(scope="module")
def shards(s3_server, tmp_path_factory) -> tuple[str, str]:
    """The same shards on disk and in bucket `shards` (tars only, no sidecars: read by streaming); their `urls`."""
    folder = tmp_path_factory.mktemp("shards")
    _write_shards(folder)
    client = s3_server.client()
    client.create_bucket(Bucket="shards")
    for s in range(SHARDS):
        client.upload_file(str(folder / f"train-{s}.tar"), "shards", f"pretrain/train-{s}.tar")
    remote = s3_server.uri("shards", f"pretrain/train-{{0..{SHARDS - 1}}}.tar")
    return str(folder / f"train-{{0..{SHARDS - 1}}}.tar"), remote


def _source(urls: str) -> data.SourceConfig:
    return data.SourceConfig(source="webdataset", urls=urls, size=128 * SHARDS, num_classes=16, image_size=32)


def test_a_webdataset_source_reads_its_shards_from_object_storage(shards, tmp_path):
    local, remote = shards
    ours = data.load(data.prepare(_source(remote), tmp_path / "remote", progress=False).subset(), 32)
    theirs = data.load(data.prepare(_source(local), tmp_path / "local", progress=False).subset(), 32)
    assert len(ours.keys) == 128 * SHARDS
    assert ours.keys == theirs.keys and np.array_equal(ours.images, theirs.images)
    assert np.array_equal(ours.labels, theirs.labels)


def test_an_evaluation_reads_only_its_samples_byte_spans_from_object_storage(shards, tmp_path, monkeypatch):
    """Evaluation reads a plain tar in object storage by byte range, adjacent samples in one request (pretraining
    streams it): a sparse subset costs its samples' bytes, and gives the numbers the local copy gives."""
    import torch

    from pipelines import metrics, models
    from pipelines.data import eval_batches, reader
    from pipelines.data.index import RANGED, ShardSubset

    local, remote = shards
    theirs = data.prepare(_source(local), tmp_path / "local", progress=False).index()
    ours = data.prepare(_source(remote), tmp_path / "remote", progress=False).index()
    assert np.all(np.asarray(ours.shard_seekable) == RANGED)  # no sidecar: indexed by streaming, offsets kept
    for column in ("offset", "size", "key", "label"):
        assert np.array_equal(getattr(ours, column), getattr(theirs, column))
    runs = [[3, 4, 5], [130], [300, 301], [500]]  # adjacent samples, in each of the 4 shards of 128
    rows = np.array([row for run in runs for row in run])
    streamed, reads = [], []
    open_url, read = reader.open_url, reader.ShardFiles.read
    monkeypatch.setattr(reader, "open_url", lambda url: streamed.append(url) or open_url(url))
    monkeypatch.setattr(reader.ShardFiles, "read", lambda self, path, offset, size: reads.append((path, offset, size))
                        or read(self, path, offset, size))
    torch.manual_seed(0)
    model, cpu = models.build("ViT-Pico/4", 16, 32), torch.device("cpu")
    got = metrics.evaluate(model, ShardSubset(ours, rows), 32, cpu)
    first, last = ours.offset.astype(np.int64), (ours.offset + ours.size).astype(np.int64)
    assert streamed == [] and reads == [(ours.shard_url(row[0] // 128), first[row[0]], last[row[-1]] - first[row[0]])
                                        for row in runs]  # one request per run, each the run's bytes alone
    assert got == metrics.evaluate(model, ShardSubset(theirs, rows), 32, cpu)
    ranged = next(eval_batches(ShardSubset(ours, rows), 32, workers=1))  # from a loader worker too
    assert ranged.keys == theirs.keys_of(rows)
    assert np.array_equal(ranged.images, next(eval_batches(ShardSubset(theirs, rows), 32)).images)


def test_credentials_in_a_storage_uri_are_refused_without_being_printed():
    assert redact("s3://AKID:sec-ret@bucket/runs?endpoint_override=h:9000") == \
        "s3://***@bucket/runs?endpoint_override=h:9000"
    assert redact("s3://bucket/runs?scheme=http&secret_key=sec-ret&region=x") == \
        "s3://bucket/runs?scheme=http&secret_key=***&region=x"
    plain = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert redact(plain) == plain
    with pytest.raises(UserError, match="environment variables") as err:
        Storage("s3://AKID:sec-ret@bucket/runs")
    assert "sec-ret" not in str(err.value) and "AKID" not in str(err.value)


def test_storage_that_cannot_be_read_or_written_is_one_line_before_any_work(s3_server, tmp_path, monkeypatch):
    """A bucket that is not there, refused credentials, an endpoint down: the dry run reads, the run writes a probe,
    and either says so in one line instead of a traceback once the data are prepared."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]  # nothing listens there
    s3_server.client().create_bucket(Bucket="there")
    cases = [(f"s3://nobucket/x?endpoint_override={s3_server.host}&scheme=http", "write"),  # (not made for us)
             (s3_server.uri("there", "x"), None),
             (f"s3://there/x?endpoint_override=127.0.0.1:{down}&scheme=http", "read")]
    for uri, fails in cases:
        storage = Storage(uri)
        for write in (False, True):
            if fails is None or (fails == "write" and not write):
                storage.check(write)
                continue
            with pytest.raises(UserError, match=rf"^--storage .*: cannot {'write' if write else 'read'} there \(.+\); "
                                                r"check the bucket, the endpoint and the credentials"):
                storage.check(write)
    left = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="there").get("Contents", [])]
    assert left == ["x/"]  # the root's folder marker (a run makes it anyway), not the probe


# The end-to-end study: one output folder, three invocations (SIGKILLed, the same command, one more subset). 100
# steps, a checkpoint every 20 (each is an upload to the bucket): the kill after the first leaves 80 to resume.
STUDY = ["-m", "study.run", "--grid", "configs/smoke.yaml", "models=[ViT-Pico/4]", "pretrain.steps=100",
         "pretrain.checkpoint_every=20", "evaluate.finetune.steps=4", "evaluate.finetune.lr=0.01",
         "data.pretrain.source=webdataset", "data.pretrain.size=512", "data.pretrain.test_size=0"]
ACTION = re.compile(r"^ViT-Pico/4\s+([\d,]+)\s+\d+\s+.*\s(reuse|log|evaluate\S*|resume|train)$", re.M)


def _actions(stdout: str) -> dict[int, str]:
    return {int(m[1].replace(",", "")): m[2] for m in ACTION.finditer(stdout)}


def _children(out):
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    return [r for r in runs if r.data.tags.get("study_role") == "point"]


@pytest.fixture(scope="module")
def study(s3_server, shards, tmp_path_factory, cache_dir):
    """The study's output folder, storage, command, and the output of each invocation, by name."""
    out = tmp_path_factory.mktemp("s3-study")
    uri = s3_server.uri("study-bucket", "vit-scaling")
    args = [*STUDY, f"data.pretrain.urls={shards[1]}", "--out", str(out), "--storage", uri]
    return out, Storage(uri), args, {}


def _checkpointed(storage: Storage) -> bool:
    return any(storage.newest_checkpoint(PointFiles(p).checkpoints) for p in storage.list_dir("points"))


@pytest.mark.slow
def test_a_study_on_object_storage_resumes_after_sigkill_and_extends(study, cache_dir):
    out, storage, args, outputs = study
    proc = start_cli([*args, "data.subsets=[256]"], cache_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     start_new_session=True)
    wait_until(proc, lambda: _checkpointed(storage), "a checkpoint in the bucket")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, all at once
    outputs["killed"] = proc.communicate(timeout=60)
    time.sleep(3)  # Ray's processes notice their driver is gone
    (point,) = storage.list_dir("points")
    assert not storage.exists(PointFiles(point).weights)  # killed mid-pretraining

    again = run_cli([*args, "data.subsets=[256]"], cache_dir, timeout=600)
    outputs["rerun"] = again.stdout, again.stderr
    assert again.returncode == 0, again.stderr[-3000:]
    assert _actions(again.stdout) == {256: "resume"}
    (child,) = [c for c in _children(out) if c.info.status == "FINISHED"]
    assert child.data.metrics["resumed_from_step"] > 0
    assert storage.exists(PointFiles(point).weights) and (out / "smoke" / "results.csv").exists()

    more = run_cli([*args, "data.subsets=[256,512]"], cache_dir, timeout=600)
    outputs["extended"] = more.stdout, more.stderr
    assert more.returncode == 0, more.stderr[-3000:]
    actions = _actions(more.stdout)
    assert actions[512] == "train" and actions[256] in ("reuse", "log"), actions
    children = _children(out)
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    assert child.info.run_id in {c.info.run_id for c in children}  # the old point's child, not a new one
    assert len(storage.list_dir("points")) == 2
    assert set(pd.read_csv(out / "smoke" / "results.csv")["subset_size"]) == {256, 512}


@pytest.mark.slow
def test_no_credential_reaches_the_outputs_the_bucket_or_the_logs(study, s3_server):
    """After the study above: the secret is in nothing it wrote (MLflow's database and artifacts, results, figures,
    the bucket: Ray Tune's state included) nor in what it printed."""
    out, _, _, outputs = study
    assert set(outputs) == {"killed", "rerun", "extended"}, "needs the study of the test above"
    for stdout, stderr in outputs.values():
        assert SECRET not in stdout and SECRET not in stderr
    found = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not found, found
    stored = s3_server.objects("study-bucket")
    assert any(k.startswith("vit-scaling/tune/") for k in stored)  # Ray's own state is in the bucket too
    assert [k for k, v in stored.items() if SECRET.encode() in v] == []
