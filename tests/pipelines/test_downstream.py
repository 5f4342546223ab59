"""The evaluations table and the loop over it: every row loads and parses, evaluations run one at a time in a
trial (each timed and recorded on its own) and share one pass of frozen features; selected hyperparameters are
measured too."""

import dataclasses
import pickle

import pytest
import torch

from pipelines import data, downstream, evaluations, models
from pipelines.config import ConfigError, to_dict
from pipelines.data.stream import LoaderConfig
from pipelines.downstream import EvaluateConfig, Pretrained
from pipelines.fewshot import FewshotConfig
from pipelines.linear_probe import LinearProbeConfig
from pipelines.runtime import Runtime
from tests.pipelines import glyph_task


@pytest.mark.parametrize("row", evaluations.TABLE, ids=lambda row: row.name)
def test_every_row_names_a_module_with_a_config_a_default_and_measure(row):
    module = row.load()
    assert dataclasses.is_dataclass(module.Config) and callable(module.measure)
    assert module.DEFAULT is None or isinstance(module.DEFAULT, module.Config)
    assert row.needs in (evaluations.FEATURES, evaluations.PRETRAINED, evaluations.PRETRAIN_IMAGES)
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
