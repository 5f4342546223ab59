"""One grid point in-process (`run_point`: plain Python, real storage and torch, no Ray): evaluation during
training and the step it selects."""

import pytest
from safetensors.torch import load as load_weights

from study.config import expand, load_study
from study.identity import eval_ids
from study.protocol import Curve
from study.storage import PointFiles, Storage
from study.trial import TrialPlan, run_point
from tests.conftest import ROOT


def test_select_best_logs_each_step_and_the_point_reports_the_chosen_steps_numbers(tmp_path, cache_dir):
    cfg = load_study(ROOT / "configs" / "smoke.yaml", [
        "models=[ViT-Pico/4]", "data.subsets=[256]", "pretrain.eval_every=6", f"data.cache_dir={cache_dir}",
        "evaluate.linear_probe=null", "evaluate.finetune=null", "evaluate.diagnostics=null"])
    (point,) = expand(cfg)
    events, storage = [], Storage(str(tmp_path / "storage"))
    record = run_point(cfg, TrialPlan(point, "train", eval_ids(cfg)), storage, tmp_path / "scratch", events.append)
    curves = {(e.prefix, e.step): e.values for e in events if isinstance(e, Curve)}
    val = {step: curves["pretrain/val", step]["top1"] for step in (6, 12)}
    shots = {step: curves["pretrain/fewshot/shapes-novel", step] for step in (6, 12)}
    chosen = max((6, 12), key=lambda step: (shots[step]["5shot_top1"], -step))  # the 5-shot headline, first best
    summary = record.pretrain
    assert (summary.selected_step, summary.selected_score) == (chosen, shots[chosen]["5shot_top1"])
    assert summary.val_top1 == pytest.approx(val[chosen])  # upstream top-1 of the kept weights
    final = {f"{m.shots}shot_top1": m.value for m in record.evals["fewshot"].measurements}
    assert final == pytest.approx(shots[chosen])  # the evaluations ran on the chosen step's weights
    files = PointFiles(point.id)
    best, last = (load_weights(storage.read_bytes(f)) for f in (files.best_weights, files.weights))
    assert best.keys() == last.keys() and (chosen == 12) == all((best[k] == last[k]).all() for k in best)
