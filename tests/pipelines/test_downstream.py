"""The evaluations table and the loop over it: every row loads and parses, evaluations run one at a time in a
trial (each timed and recorded on its own) and share one pass of frozen features; selected hyperparameters are
measured too."""

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipelines import data, downstream, evaluations, fewshot, finetune, linear_probe, models
from pipelines.config import ConfigError, to_dict
from pipelines.data.stream import LoaderConfig
from pipelines.downstream import EvaluateConfig, Pretrained
from pipelines.fewshot import FewshotConfig
from pipelines.linear_probe import LinearProbeConfig
from pipelines.runtime import Runtime
from tests.pipelines import glyph_task
from tests.pipelines.test_distributed import _free_port


@pytest.mark.parametrize("row", evaluations.TABLE, ids=lambda row: row.name)
def test_every_row_names_a_module_with_a_config_a_default_and_measure(row):
    module = row.load()
    assert dataclasses.is_dataclass(module.Config) and callable(module.measure)
    assert module.DEFAULT is None or isinstance(module.DEFAULT, module.Config)
    assert row.needs in (evaluations.FEATURES, evaluations.ROW_FEATURES, evaluations.PRETRAINED,
                         evaluations.PRETRAIN_IMAGES)
    assert len(set(evaluations.names())) == len(evaluations.TABLE)


def test_the_evaluate_section_parses_by_the_table_and_round_trips():
    ev = EvaluateConfig.from_config({"fewshot": {"shots": [1, 2]}, "linear_probe": None}, "evaluate")
    assert ev.fewshot == FewshotConfig(shots=(1, 2)) and ev.linear_probe is None
    assert [row.name for row, _ in ev.enabled()] == ["fewshot", "finetune", "diagnostics"]
    assert EvaluateConfig.from_config(to_dict(ev), "evaluate") == ev == pickle.loads(pickle.dumps(ev))
    with pytest.raises(ConfigError, match="unknown key 'evaluate.fewshott'; valid keys here: fewshot, linear_probe, "
                                          "finetune, diagnostics"):
        EvaluateConfig.from_config({"fewshott": {"shots": [1]}}, "evaluate")
    with pytest.raises(ConfigError, match="evaluate.fewshot.shotz"):
        EvaluateConfig.from_config({"fewshot": {"shotz": [1]}}, "evaluate")
    with pytest.raises(AttributeError):
        ev.fewshot = None


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    task = glyph_task.digit_task(root, 200, 100)
    torch.manual_seed(0)
    model = models.build("BiT-R14-Pico", 16, 32)
    runtime = Runtime(torch.device("cpu"), cache_dir=root, loader=LoaderConfig(workers=0), progress=False)
    return task, Pretrained("BiT-R14-Pico", model, model.state_dict(), 32), runtime


def test_kinds_run_one_at_a_time_share_one_feature_pass_and_match_a_joint_run(digits, monkeypatch):
    task, model, runtime = digits
    ev = EvaluateConfig(fewshot=FewshotConfig(shots=(1, 5), repeats=2),
                        linear_probe=LinearProbeConfig(l2_grid=(1e-3, 1e-1), max_iter=50), finetune=None)

    def run(kinds, cache=None):
        return downstream.run(ev, model, (task,), runtime, kinds=kinds, cache=cache)

    joint = run(("fewshot", "linear_probe"))
    passes = []
    extract = downstream.features
    monkeypatch.setattr(downstream, "features", lambda *a, **k: passes.append(1) or extract(*a, **k))
    cache: dict = {}
    apart = run(("fewshot",), cache) + run(("linear_probe",), cache)
    assert len(passes) == 2  # train and test split, once each
    assert apart == joint
    run(("fewshot",))  # without a cache each call extracts its own
    assert len(passes) == 4
    probe = {m.metric: m.value for m in joint if m.eval == "linear_probe"}
    assert set(probe) == {"top1", "macro_f1", "l2"} and probe["l2"] in (1e-3, 1e-1)  # the chosen strength
    assert {(m.eval, m.dataset, m.shots) for m in joint if m.eval == "fewshot"} == {("fewshot", task.label, 1),
                                                                                   ("fewshot", task.label, 5)}


@pytest.mark.parametrize("probe", [LinearProbeConfig(), LinearProbeConfig(l2_grid=(1e-3, 1e-1), max_iter=50)],
                         ids=["same settings", "other settings"])
def test_lp_ft_starts_from_the_shared_features_and_probe_with_the_numbers_of_its_own_pass(digits, monkeypatch, probe):
    """LP-FT at the pretraining resolution, on the whole train split: its probe head comes from the features the
    probe evaluation extracted (one pass of the train split for both), and from the evaluation's fit where their
    settings agree; the fine-tune's numbers are those of the head it fits alone (`finetune.probe_head`)."""
    task, model, runtime = digits
    ft = finetune.FinetuneConfig(image_size=32, steps=6, batch_size=32, lr=0.01, warmup_steps=1, val_fraction=0,
                                 head_init="probe")
    ev = EvaluateConfig(fewshot=None, linear_probe=probe, finetune=ft, diagnostics=None)
    train, test = downstream.task_splits(task, runtime.cache_dir)
    alone = finetune.run(ft, model.name, model.state, train, test, task.num_classes, runtime, options=model.options)
    passes, fits = [], []
    extract, fit = downstream.features, linear_probe.fit
    monkeypatch.setattr(downstream, "features", lambda *a, **k: passes.append(1) or extract(*a, **k))
    monkeypatch.setattr(linear_probe, "fit", lambda *a, **k: fits.append(a[0]) or fit(*a, **k))
    cache: dict = {}
    found = downstream.run(ev, model, (task,), runtime, kinds=("linear_probe",), cache=cache)
    found += downstream.run(ev, model, (task,), runtime, kinds=("finetune",), cache=cache)
    assert len(passes) == 2  # the train and the test split, once each
    assert fits == ([probe] if probe == LinearProbeConfig() else [probe, LinearProbeConfig()])
    got = {(m.eval, m.metric): m.value for m in found}
    assert (got["finetune", "top1"], got["finetune", "macro_f1"]) == (alone.top1, alone.macro_f1)
    assert finetune.probe_on_frozen_features(ft, 32, model.options)
    for other in (dataclasses.replace(ft, image_size=48), dataclasses.replace(ft, val_fraction=0.1),
                  dataclasses.replace(ft, head_init="zero")):
        assert not finetune.probe_on_frozen_features(other, 32, model.options)  # its own pass, as before
    assert not finetune.probe_on_frozen_features(ft, 32, models.ModelOptions(pre_logits=True))


def test_diagnostics_run_once_on_the_pretraining_images_and_keep_their_file(digits, tmp_path):
    task, model, runtime = digits
    source = data.prepared(task, runtime.cache_dir)  # stands in for the pretraining source
    kept = {}
    ev = EvaluateConfig(fewshot=None, linear_probe=None, finetune=None)
    found = downstream.run(ev, dataclasses.replace(model, source=source), (task, task), runtime,
                           on_file=kept.__setitem__)
    assert {m.eval for m in found} == {"diagnostics"} and {m.dataset for m in found} == {"pretrain"}
    assert [m.metric for m in found] == ["rf_stage1", "rf_stage2", "rf_stage3", "rf_stage4"]  # once, not per task
    assert [m.key for m in found][0] == "diagnostics/pretrain/rf_stage1"  # the evaluation's name, prefixed once
    assert kept == {}  # a ResNet has no Fig 7 arrays to keep


def test_fewshot_alone_extracts_only_its_shots_and_the_test_split(digits, monkeypatch):
    task, model, runtime = digits
    cfg = FewshotConfig(shots=(1, 5), repeats=2)
    alone = EvaluateConfig(fewshot=cfg, linear_probe=None, finetune=None, diagnostics=None)
    shared = EvaluateConfig(fewshot=cfg, linear_probe=LinearProbeConfig(max_iter=5), finetune=None,
                            diagnostics=None)
    sizes = []
    extract = downstream.features
    monkeypatch.setattr(downstream, "features", lambda m, split, *a, **k: sizes.append(len(split)) or
                        extract(m, split, *a, **k))
    few = downstream.run(alone, model, (task,), runtime)
    train, test = downstream.task_splits(task, runtime.cache_dir)
    rows = fewshot.needed_rows(fewshot.draws(train.labels, cfg, runtime.seed))
    assert sizes == [len(rows), len(test)] and len(rows) <= 2 * 5 * 10 < len(train)  # 2 draws, 5 shots, 10 classes
    whole = downstream.run(shared, model, (task,), runtime, kinds=("fewshot",))
    assert sizes[2:] == [len(train), len(test)]  # the probe is on: the whole train split, extracted once, shared
    assert [m.shots for m in few] == [m.shots for m in whole] == [1, 5]
    assert [m.value for m in few] == pytest.approx([m.value for m in whole], abs=1e-9)  # the same features


def _evaluate_on_rank(rank: int, world: int, port: int, task, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        found = _fewshot_and_probe(task, Path(out).parent)
        if rank == 0:
            Path(out).write_text(json.dumps([dataclasses.astuple(m) for m in found]))
    finally:
        dist.destroy_process_group()


def _fewshot_and_probe(task, cache_dir: Path) -> list:
    torch.manual_seed(0)
    model = models.build("BiT-R14-Pico", 16, 32)
    runtime = Runtime(torch.device("cpu"), cache_dir=cache_dir, loader=LoaderConfig(workers=0), progress=False)
    ev = EvaluateConfig(fewshot=FewshotConfig(shots=(1, 5), repeats=2), finetune=None, diagnostics=None,
                        linear_probe=LinearProbeConfig(l2_grid=(1e-3, 1e-1), max_iter=30))
    alone = EvaluateConfig(fewshot=FewshotConfig(shots=(1, 5), repeats=2), linear_probe=None, finetune=None,
                           diagnostics=None)
    pretrained = Pretrained("BiT-R14-Pico", model, model.state_dict(), 32)
    return downstream.run(ev, pretrained, (task,), runtime) + downstream.run(alone, pretrained, (task,), runtime)


def test_two_gloo_ranks_measure_the_fewshot_and_probe_numbers_of_one_process(digits, tmp_path):
    """Each rank extracts its part, the main rank solves once and hands the numbers to the other: the same as one
    process (to 1e-6: the ranks' batches differ from one process's, so features may differ in the last bits)."""
    task, _, runtime = digits
    one = [dataclasses.astuple(m) for m in _fewshot_and_probe(task, runtime.cache_dir)]
    out = runtime.cache_dir / "two-ranks.json"
    mp.spawn(_evaluate_on_rank, args=(2, _free_port(), task, str(out)), nprocs=2, join=True)
    two = [tuple(m) for m in json.loads(out.read_text())]
    assert [m[:4] for m in two] == [m[:4] for m in one] and len(one) == 2 + 3 + 2  # few-shot, probe, few-shot alone
    assert [m[4] for m in two] == pytest.approx([m[4] for m in one], abs=1e-6)
    assert [m[5] or 0.0 for m in two] == pytest.approx([m[5] or 0.0 for m in one], abs=1e-6)  # the spreads


@pytest.mark.parametrize("name", ["ViT-Pico/4", "BiT-R14-Pico"])
def test_diagnostics_read_their_fixed_slice_of_a_source_without_a_test_split_and_nothing_for_a_bit(
        monkeypatch, name):
    from pipelines.data import reader
    from pipelines.data.index import scratch_index
    from pipelines.evaluations.diagnostics import Config as DiagnosticsConfig
    from tests.pipelines.tiny import as_shards

    rng = np.random.default_rng(0)
    local = as_shards(rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8), np.arange(40) % 4, per_shard=10)
    index = scratch_index([f"pipe:cat {url}" for url in local.index.shards])  # streamed: read from its start
    source = data.Prepared("letters", {"train": index.shards}, {"train": str(index.folder)})  # no test split
    opened, samples = [], []
    open_url, read_shard = reader.open_url, reader.read_shard
    monkeypatch.setattr(reader, "open_url", lambda url: opened.append(url) or open_url(url))
    monkeypatch.setattr(reader, "read_shard", lambda url: (samples.append(s) or s for s in read_shard(url)))
    torch.manual_seed(0)
    model = models.build(name, 4, 16)
    ev = EvaluateConfig(fewshot=None, linear_probe=None, finetune=None, diagnostics=DiagnosticsConfig(batch=5))
    runtime = Runtime(torch.device("cpu"), loader=LoaderConfig(workers=0), progress=False)
    found = downstream.run(ev, Pretrained(name, model, model.state_dict(), 16, source), (), runtime)
    assert found and {m.dataset for m in found} == {"pretrain"}
    if name.startswith("ViT"):  # its 5 images: the first shard, read to the 5th sample (one more header seen)
        assert opened == index.shards[:1] and len(samples) == 5
    else:
        assert opened == [] and samples == []  # a receptive field needs no image


def test_what_the_evaluations_cannot_measure_is_refused_in_one_line_naming_the_key(digits, tmp_path):
    from pipelines.config import UserError
    from pipelines.data.index import scratch_index
    from pipelines.data.writer import encode_png, write_samples

    task, model, runtime = digits
    index = data.prepared(task, runtime.cache_dir).index()
    with pytest.raises(UserError, match=r"^evaluate.fewshot.shots: 25-shot asked, but class \d of downstream task "
                                        r"'digits' has only \d+ training examples$"):
        downstream.check_task(EvaluateConfig(fewshot=FewshotConfig(shots=(25,))), task, index)
    image = np.zeros((8, 8, 3), np.uint8)
    write_samples(tmp_path / "multi.tar", ({"__key__": f"{i:04d}", "png": encode_png(image),
                                            "json": json.dumps({"labels": [i % 3, 3]}).encode()} for i in range(6)))
    multi = scratch_index([str(tmp_path / "multi.tar")])
    assert multi.label_width == 2
    with pytest.raises(UserError, match=r"^evaluate.linear_probe: downstream task 'digits' is multi-label \(up to 2 "
                                        r"classes per sample\).*set evaluate.linear_probe=null$"):
        downstream.check_task(EvaluateConfig(fewshot=None), task, multi)
    downstream.check_task(EvaluateConfig(fewshot=FewshotConfig(shots=(5,))), task, index)  # supported: no error


def test_frozen_passes_run_in_the_runtimes_precision(digits, monkeypatch):
    """The features an evaluation extracts, and the fine-tune's evaluation logits, run in the precision the study
    set (the pretraining's in `Runtime.precision`, the fine-tune's own): `infer` ran bf16 on a GPU whatever was set."""
    from pipelines import metrics

    task, model, runtime = digits
    asked = []
    infer = metrics.infer
    monkeypatch.setattr(downstream, "infer", lambda *a, **k: asked.append(("features", k["precision"])) or
                        infer(*a, **k))
    monkeypatch.setattr(metrics, "infer", lambda *a, **k: asked.append(("logits", k["precision"])) or infer(*a, **k))
    ev = EvaluateConfig(fewshot=FewshotConfig(shots=(1,), repeats=1), linear_probe=None, diagnostics=None,
                        finetune=finetune.FinetuneConfig(image_size=32, steps=2, batch_size=32, lr=0.01, val_fraction=0,
                                                         precision="fp32"))
    downstream.run(ev, model, (task,), runtime.replace(precision="bf16"))
    assert {"features"} < {what for what, _ in asked} and {"logits"} < {what for what, _ in asked}
    assert {p for what, p in asked if what == "features"} == {"bf16"}
    assert {p for what, p in asked if what == "logits"} == {"fp32"}


def test_diagnostics_skip_an_unreadable_image_of_their_slice_instead_of_failing_the_point(tmp_path):
    """One unreadable file among the first images of a source without a test split (a user's class folder): the
    diagnostics measure the others; they failed the point, after its training and evaluations, on the 0.1% budget."""
    import io
    import tarfile

    from PIL import Image

    from pipelines.data.index import scratch_index
    from pipelines.evaluations.diagnostics import Config as DiagnosticsConfig

    rng = np.random.default_rng(0)
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(12):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
            for ext, raw in (("jpg", b"garbage" if i == 5 else buf.getvalue()), ("cls", str(i % 4).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    index = scratch_index([str(shard)])
    source = data.Prepared("mine", {"train": index.shards}, {"train": str(index.folder)})
    torch.manual_seed(0)
    model = models.build("ViT-Pico/4", 4, 16)
    ev = EvaluateConfig(fewshot=None, linear_probe=None, finetune=None, diagnostics=DiagnosticsConfig(batch=12))
    runtime = Runtime(torch.device("cpu"), loader=LoaderConfig(workers=0), progress=False)
    found = downstream.run(ev, Pretrained("ViT-Pico/4", model, model.state_dict(), 16, source), (), runtime)
    assert found and all(np.isfinite(m.value) for m in found)
