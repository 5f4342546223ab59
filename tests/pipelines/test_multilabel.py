"""Multi-label sources (JFT-style, the ImageNet-21k winter release): several classes per sample, from a `.cls` with
several integers or a `.json` `labels` list, through the index, the stream loader, class counts and a `sigmoid`
pretraining run; `softmax` on such a source is refused; single-label sources are carried exactly as before."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import data, pretrain
from pipelines.config import UserError
from pipelines.data import index as index_module
from pipelines.data import scan
from pipelines.data.augment import Augment
from pipelines.data.index import scratch_index
from pipelines.data.labels import parse_labels
from pipelines.data.sources import SIDECAR_VERSION, read_sidecar, sidecar_url
from pipelines.data.stream import LoaderConfig, ShardStream, ShardSubset, StreamLoader
from pipelines.data.writer import write_shard
from pipelines.loop import EpochRecord, Hooks, _Sums, loss_fn
from pipelines.runtime import Runtime
from tests.pipelines.test_stream import _shard

CLASSES = 5
IN_PROCESS = Runtime(torch.device("cpu"), loader=LoaderConfig(workers=0), progress=False)
NONE = Augment(crop="none", flip=False)


def _image(rng, fmt: str, classes: list[int]) -> bytes:
    """A 16x16 image whose pixels say its classes (class c brightens stripe c), so a model can learn them."""
    pixels = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
    for c in classes:
        pixels[:, 3 * c:3 * c + 3] = 230
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _members(i: int, rng) -> tuple[dict[str, bytes], list[int]]:
    """Sample i's tar members and its expected classes: one class in `.cls`, several in `.cls` (space- or
    comma-separated), several in a `.json` `labels` list alone, or a `.cls` class joined by `.json` labels."""
    kind = i % 5
    if kind == 0:
        classes = [i % CLASSES]
        return {"jpg": _image(rng, "JPEG", classes), "cls": str(classes[0]).encode()}, classes
    if kind == 1:
        classes = sorted({i % CLASSES, (i + 2) % CLASSES})
        return {"png": _image(rng, "PNG", classes), "cls": f"{classes[1]} {classes[0]}\n".encode()}, classes
    if kind == 2:
        classes = sorted({i % CLASSES, (i + 1) % CLASSES, (i + 3) % CLASSES})
        return {"jpg": _image(rng, "JPEG", classes), "cls": ",".join(map(str, classes[::-1])).encode()}, classes
    if kind == 3:
        classes = sorted({i % CLASSES, (i + 4) % CLASSES})
        return {"jpg": _image(rng, "JPEG", classes), "json": json.dumps({"labels": classes[::-1]}).encode()}, classes
    classes = sorted({i % CLASSES, (i + 1) % CLASSES})
    meta = json.dumps({"labels": [classes[1]], "caption": "x"}).encode()
    return {"jpg": _image(rng, "JPEG", classes), "cls": str(classes[0]).encode(), "json": meta}, classes


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """3 shards of 20 samples: (shard paths, {key: its classes})."""
    root, rng = tmp_path_factory.mktemp("multilabel"), np.random.default_rng(0)
    paths, truth = [], {}
    for s in range(3):
        samples = []
        for i in range(20):
            parts, classes = _members(20 * s + i, rng)
            samples.append((f"s{s}-{i:02d}", parts))
            truth[f"s{s}-{i:02d}"] = classes
        _shard(root / f"train-{s}.tar", samples)
        paths.append(str(root / f"train-{s}.tar"))
    return paths, truth


def _rows(labels: np.ndarray) -> list[list[int]]:
    return [sorted(int(c) for c in row if c >= 0) for row in labels]


def test_labels_parse_from_cls_and_json():
    assert parse_labels(b"3", None) == 3
    assert parse_labels(b"4 1\n", None) == [1, 4] and parse_labels(b"2,0, 2", None) == [0, 2]
    assert parse_labels(None, b'{"labels": [7, 2]}') == [2, 7]
    assert parse_labels(b"1", b'{"labels": [1, 6], "sha256": "x"}') == [1, 6]
    assert parse_labels(None, b'{"path": "a.jpg"}') == -1 and parse_labels(None, None) == -1
    assert parse_labels(b"1 x", None) is None and parse_labels(None, b'{"labels": ["a"]}') is None
    assert parse_labels(b"-1", None) is None


def _everything(paths) -> ShardSubset:
    index = scratch_index(paths)
    return ShardSubset(index, np.arange(len(index), dtype=np.int64))


def test_the_index_holds_every_label(source):
    paths, truth = source
    subset = _everything(paths)
    assert subset.index.label_width == 3 and subset.index.label_ptr is not None  # CSR columns
    keys = subset.index.keys_of(subset.positions)
    assert subset.labels.dtype == np.int64 and subset.labels.shape == (60, 3)
    assert dict(zip(keys, _rows(subset.labels), strict=True)) == truth


@pytest.mark.parametrize("remote", [False, True], ids=["by-offset", "streamed"])
def test_the_loader_yields_each_samples_classes(source, remote):
    paths, truth = source
    urls = [f"pipe:cat {p}" for p in paths] if remote else paths
    stream = ShardStream(_everything(urls), 16, 12, NONE, seed=0)
    batches = StreamLoader(stream, workers=0).batches()
    seen = {}
    for _ in range(5):  # one epoch: 60 samples
        batch = next(batches)
        assert batch.labels.dtype == torch.int64 and batch.labels.shape == (12, 3)
        seen.update(zip(batch.keys, _rows(batch.labels.numpy()), strict=True))
    assert seen == truth
    target = (batch.labels[:, :, None] == torch.arange(CLASSES)).any(1).float()
    from pipelines.loop import multi_hot
    assert torch.equal(multi_hot(batch.labels, CLASSES, torch.float32), target)
    assert torch.equal(multi_hot(batch.labels, CLASSES, torch.float32).sum(1),
                       torch.tensor([len(truth[k]) for k in batch.keys], dtype=torch.float32))


def test_evaluation_batches_and_class_counts_carry_every_label(source):
    paths, truth = source
    split = data.load(paths, 16)
    assert split.labels.shape == (60, 3)
    assert dict(zip(split.keys, _rows(split.labels), strict=True)) == truth
    counts = data.class_counts(_everything(paths).labels, CLASSES)
    expected = np.bincount([c for classes in truth.values() for c in classes], minlength=CLASSES)
    assert data.class_counts(_everything(paths), CLASSES, chunk=7) == counts  # a subset, read 7 rows at a time
    assert counts["counts"] == expected.tolist() and sum(counts["counts"]) > len(truth)
    assert counts["min"] == expected.min() and counts["max"] == expected.max() and counts["empty_classes"] == 0


def test_sigmoid_loss_and_top1_on_multi_hot_targets():
    logits = torch.tensor([[0.0, 2.0, 1.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 5.0]])
    labels = torch.tensor([[2, 1, -1], [3, -1, -1], [0, 4, 2]])
    target = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [1, 0, 1, 0, 1]], dtype=torch.float32)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 3
    assert torch.allclose(loss_fn("sigmoid", logits, labels), expected)
    sums = _Sums(torch.device("cpu"))
    sums.add(torch.tensor(1.0), logits, labels)  # argmax 1, 0, 4: among the labels for samples 0 and 2
    assert sums.read(1, "t")[1:] == [2, 3]
    single = _Sums(torch.device("cpu"))
    single.add(torch.tensor(1.0), logits, torch.tensor([4, 0, 1]))  # single-label: as before
    assert single.read(1, "t")[1:] == [1, 3]
    with pytest.raises(ValueError, match="sigmoid"):
        loss_fn("softmax", logits, labels)


def test_sigmoid_pretraining_on_a_multi_label_source_learns(source):
    paths, truth = source
    subset = _everything(paths)
    cfg = pretrain.PretrainConfig(steps=30, batch_size=12, lr=3e-3, warmup_steps=2, loss="sigmoid", precision="fp32",
                                  augment=NONE, compile=False, checkpoint_every=0)
    epochs: list[EpochRecord] = []
    torch.set_num_threads(1)
    result = pretrain.run(cfg, "ViT-Pico/4", subset, CLASSES, 16, IN_PROCESS, Hooks(on_epoch=epochs.append))
    assert len(epochs) == 6 and all(np.isfinite(m.loss) for m in epochs)
    assert epochs[-1].loss < 0.7 * epochs[0].loss, [m.loss for m in epochs]
    assert result.final.train_top1 > 60  # a top-1 among a sample's classes counts: chance is ~40%


def test_softmax_on_a_multi_label_source_is_refused_in_one_line(source):
    paths, truth = source
    everything = _everything(paths)
    index = everything.index
    singles = everything.part(np.flatnonzero((everything.labels >= 0).sum(1) == 1))  # the source decides
    cfg = pretrain.PretrainConfig(steps=2, batch_size=4, loss="softmax", compile=False)
    with pytest.raises(UserError) as err:
        pretrain.run(cfg, "ViT-Pico/4", singles, CLASSES, 16, IN_PROCESS)
    message = str(err.value)
    assert "\n" not in message and "multi-label" in message and "pretrain.loss=sigmoid" in message
    pretrain.check_labels("sigmoid", index)  # the driver's up-front check: sigmoid is fine


def test_a_single_label_source_is_carried_as_before(tmp_path):
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "train-0.tar", ((f"{i:03d}", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), i % 4)
                                           for i in range(24)))
    shards = [str(tmp_path / "train-0.tar")]
    index = data.SourceIndex(data.cached_index(shards, tmp_path / "cache"))
    assert index.label_width == 1 and index.label_ptr is None and index.label.tolist() == [i % 4 for i in range(24)]
    assert not (index.folder / "label_ptr.bin").exists()  # 24 bytes a sample: no CSR for a single-label source
    subset = ShardSubset(index, np.arange(24))
    assert subset.labels.dtype == np.int64 and subset.labels.tolist() == [i % 4 for i in range(24)]
    batch = next(StreamLoader(ShardStream(subset, 16, 8, NONE, seed=0), workers=0).batches())
    assert batch.labels.dtype == torch.int64 and batch.labels.shape == (8,)
    assert batch.labels.tolist() == [int(k) % 4 for k in batch.keys]
    assert data.load(shards, 16).labels.shape == (24,)
    pretrain.check_labels("softmax", index)  # no refusal


def test_an_index_from_an_older_reader_is_not_reused(tmp_path):
    """Older readers stored -1 for a multi-class `.cls` and ignored `.json` labels: their sidecars (no version) are
    not read, and the index cache key carries the version."""
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "train-0.tar", ((f"{i:03d}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), 1)
                                           for i in range(3)))
    url = f"pipe:cat {tmp_path}/train-0.tar"
    side = json.loads(open(sidecar_url(str(tmp_path / "train-0.tar"))).read())
    assert side["version"] == SIDECAR_VERSION and read_sidecar(url) is not None
    del side["version"]
    open(sidecar_url(str(tmp_path / "train-0.tar")), "w").write(json.dumps(side))
    assert read_sidecar(url) is None
    cache = tmp_path / "cache"
    data.cached_index([str(tmp_path / "train-0.tar")], cache)
    with pytest.MonkeyPatch.context() as patch:  # the next version's writer and reader
        for module, version in ((index_module, index_module.INDEX_VERSION + 1), (scan, scan.INDEX_VERSION + 1)):
            patch.setattr(module, "INDEX_VERSION", version)
        data.cached_index([str(tmp_path / "train-0.tar")], cache)
    assert len([p for p in cache.iterdir() if (p / "meta.json").exists()]) == 2  # another version, another key


def test_held_out_metrics_on_a_multi_label_split():
    """The upstream val_top1 of a multi-label source: a top-1 among the sample's classes counts; sigmoid loss."""
    from pipelines.metrics import classification_metrics

    logits = np.array([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([[1, 2], [1, -1], [2, 0]])
    got = classification_metrics(logits, labels)
    target = torch.tensor([[0, 1, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.float64)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits), target,
                                                                    reduction="sum") / 3
    assert got["top1"] == pytest.approx(200 / 3) and got["loss"] == pytest.approx(float(expected))


def test_the_study_refuses_softmax_on_a_multi_label_source_before_ray_starts(source, tmp_path, monkeypatch, capsys):
    """`main` as the command line calls it, in this process (a Python start would cost ~8 s of imports)."""
    from study.run import main
    from tests.conftest import ROOT

    paths, truth = source
    urls = str(Path(paths[0]).parent / "train-{0..2}.tar")
    monkeypatch.setenv("VITSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    code = main(["--grid", "configs/smoke.yaml", "--out", str(tmp_path), "data.pretrain.source=webdataset",
                 f"data.pretrain.urls={urls}", "data.pretrain.size=60", "data.pretrain.test_size=0",
                 f"data.pretrain.num_classes={CLASSES}", "data.subsets=[30]", "data.pretrain.image_size=16"])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.strip().count("\n") == 0, stderr[-2000:]
    assert "multi-label" in stderr and "pretrain.loss=sigmoid" in stderr
    # Nothing ran and nothing was tracked; only the source's index was stored (a rerun reuses it).
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "smoke" / "storage" / "points").exists()
    assert [p.name for p in (tmp_path / "smoke").iterdir()] == ["storage"]
