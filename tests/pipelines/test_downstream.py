"""Few-shot and the probe run one evaluation kind at a time in a trial (each is timed and recorded on its own);
the frozen features they share are extracted once."""

import pytest
import torch

from pipelines import downstream, models
from pipelines.downstream import EvaluateConfig
from pipelines.fewshot import FewshotConfig
from pipelines.linear_probe import LinearProbeConfig
from tests.pipelines import glyph_task


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    task = glyph_task.digit_task(root, 200, 100)
    return task, root


def test_kinds_run_one_at_a_time_share_one_feature_pass_and_match_a_joint_run(digits, monkeypatch):
    task, root = digits
    torch.manual_seed(0)
    model = models.build("BiT-R14-Pico", 16, 32)
    ev = EvaluateConfig(fewshot=FewshotConfig(shots=(1, 5), repeats=2),
                        linear_probe=LinearProbeConfig(l2_grid=(1e-3, 1e-1), max_iter=50), finetune=None)

    def run(kinds, cache=None):
        return downstream.run(ev, task, "BiT-R14-Pico", model, model.state_dict(), 32, root, 0, torch.device("cpu"),
                              kinds=kinds, feature_cache=cache)

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
