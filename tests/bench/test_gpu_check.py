"""bench/gpu_check.py on a CPU: the skip without CUDA (in a subprocess, as a user runs it), and the parts of its
checks that do not need a GPU: the table and JSON, the budget and error handling, the save/resume round trip,
the solves, the smoke study's error path."""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bench import gpu_check
from pipelines import checkpoint
from tests.conftest import ROOT

CPU = torch.device("cpu")


def _no_cuda_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore", **extra}


def test_without_cuda_it_says_it_skipped_exits_0_and_writes_a_skipped_json(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=_no_cuda_env(OUT=str(out)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == gpu_check.SKIP_LINE
    assert json.loads((out / "gpu_check.json").read_text()) == {"skipped": True, "reason": "no CUDA device",
                                                                 "rows": []}


def test_without_cuda_and_without_out_it_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--only", "throughput"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_no_cuda_env())
    assert (proc.returncode, proc.stdout.strip()) == (0, gpu_check.SKIP_LINE)
    assert list(tmp_path.iterdir()) == []


ROWS = [{"check": "throughput", "model": "ViT-B/16", "precision": "bf16", "compiled": False, "step_time_s": 0.3,
         "mfu": 0.4123456},
        {"check": "throughput", "model": "ViT-B/16", "precision": "bf16", "compiled": True, "step_time_s": 0.2,
         "mfu": math.nan},
        {"check": "smoke_study", "rc": 1, "error": "boom"}]


def test_table_has_every_column_in_order_of_first_appearance_and_aligned_cells():
    lines = gpu_check.format_table(ROWS).splitlines()
    assert lines[0].split() == ["check", "model", "precision", "compiled", "step_time_s", "mfu", "rc", "error"]
    assert len(lines) == 2 + len(ROWS)
    assert lines[2].split() == ["throughput", "ViT-B/16", "bf16", "False", "0.3", "0.4123"]  # 4 significant digits
    assert lines[3].split()[-1] == "nan"
    assert lines[4].split() == ["smoke_study", "1", "boom"]
    assert lines[4].index("1") == lines[0].index("rc")  # a row's cells sit under their column


def test_json_is_strict_with_nan_as_null():
    text = gpu_check.to_json({"rows": ROWS, "total_s": math.inf})
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert parsed["rows"][1]["mfu"] is None and parsed["total_s"] is None
    assert parsed["rows"][0]["mfu"] == ROWS[0]["mfu"]


def test_headline_is_the_compiled_over_eager_speed_up_or_says_why_not():
    assert gpu_check.headline(ROWS) == "compiled / eager speed-up, ViT-B/16 bf16: 1.50x"
    failed = [ROWS[0], {**ROWS[1], "step_time_s": None, "error": "OutOfMemoryError"}]
    assert gpu_check.headline(failed).endswith("n/a (a run failed or was skipped)")


def test_a_failing_check_is_a_row_and_the_others_still_run_and_a_check_without_time_is_skipped():
    def boom(left):
        raise RuntimeError("compile failed\nlong trace")

    checks = [gpu_check.Check({"check": "a", "model": "m"}, 0, boom),
              gpu_check.Check({"check": "b"}, 0, lambda left: [{"check": "b", "left": left}]),
              gpu_check.Check({"check": "c"}, 10**6, lambda left: pytest.fail("ran without time"))]
    rows, timings = gpu_check.run_checks(checks, budget_s=100)
    assert rows[0] == {"check": "a", "model": "m", "error": "RuntimeError: compile failed\nlong trace"}
    assert rows[1]["check"] == "b" and 0 < rows[1]["left"] <= 100
    assert rows[2]["check"] == "c" and rows[2]["skipped"].startswith("needs 1000000 s")
    assert [t["check"] for t in timings] == ["a m", "b"]


def test_plan_fits_the_default_budget_and_only_filters_by_name():
    args = argparse.Namespace(only=None, batch=8, steps=2)
    checks = gpu_check.plan(args)
    assert sum(c.budget_s for c in checks) <= 460
    assert len([c for c in checks if c.labels["check"] == "throughput"]) == 2 * 2 * 2  # models x precisions x compile
    assert [c.name for c in gpu_check.plan(argparse.Namespace(only=["round_trip"], batch=8, steps=2))] == [
        "round_trip ViT-B/16 fp16", "round_trip BiT-R50x1 fp16"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_round_trip_on_cpu_resumes_to_the_uninterrupted_weights(precision):
    (row,) = gpu_check.round_trip("ViT-Pico/4", precision, CPU, CPU, size=32, batch=4, steps=4)
    assert row["max_abs_diff"] == 0.0 and row["off_device"] == 0 and row["ok"]


def test_round_trip_notices_a_resume_that_did_not_load(monkeypatch):
    monkeypatch.setattr(checkpoint, "latest", lambda folder: None)
    (row,) = gpu_check.round_trip("ViT-Pico/4", "fp32", CPU, CPU, size=32, batch=4, steps=4)
    assert row["max_abs_diff"] > 1e-3 and not row["ok"]


def test_solves_on_cpu_time_both_and_the_probe_agrees_with_itself():
    rows = gpu_check.solves([CPU, CPU], n=400, dim=16, classes=4, max_iter=30)
    assert [r["check"] for r in rows] == ["fewshot_solve", "probe_solve", "probe_solve"]
    assert rows[0]["top1"] > 60 and rows[1]["top1"] > 60  # chance is 25: the features carry the classes
    assert rows[1]["top1"] == rows[2]["top1"] and rows[1]["speedup"] == 1.0
    assert all(r["seconds"] > 0 for r in rows)


def test_throughput_row_on_cpu_smoke():
    (row,) = gpu_check.throughput("ViT-Pico/4", "fp32", False, CPU, batch=4, steps=4, size=32)
    assert row["timed_steps"] > 0 and row["warmup_s"] > 0
    assert row["images_per_s"] == pytest.approx(4 / row["step_time_s"])
    assert math.isnan(row["mfu"]) and row["peak_memory_gb"] > 0  # no peak FLOP/s for a CPU; host RSS


def test_smoke_study_reports_a_study_that_fails_in_one_line(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_bytes(bytes(range(256)))
    (row,) = gpu_check.smoke_study(120, grid)
    assert row["rc"] == 2 and row["points"] == 0 and "\n" not in row["error"] and row["error"].startswith("error")


def test_plan_calls_each_check_with_its_own_arguments_on_cuda_0(monkeypatch):
    calls = []
    for fn in ("throughput", "round_trip", "solves", "smoke_study"):
        monkeypatch.setattr(gpu_check, fn, lambda *a, _fn=fn, **k: calls.append((_fn, a)) or [])
    for check in gpu_check.plan(argparse.Namespace(only=None, batch=8, steps=2)):
        check.run(100.0)
    throughput = [a for fn, a in calls if fn == "throughput"]
    assert sorted(a[:3] for a in throughput) == sorted((m, p, c) for m in gpu_check.MODELS for p in ("bf16", "fp16")
                                                       for c in (False, True))  # no late-bound loop variable
    assert all(a[3:] == (torch.device("cuda"), 8, 2) for a in throughput)
    assert [a for fn, a in calls if fn == "round_trip"] == [
        (m, "fp16", torch.device("cuda"), torch.device("cuda:0")) for m in gpu_check.MODELS]
    assert [a for fn, a in calls if fn == "solves"] == [([CPU, torch.device("cuda")],)]
    assert [a for fn, a in calls if fn == "smoke_study"] == [(100.0,)]


def test_main_on_a_device_prints_the_table_writes_the_json_and_ends_with_the_ratio(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check.perf, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(gpu_check, "plan", lambda args: [gpu_check.Check({"check": "rows"}, 0, lambda left: ROWS)])
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device: NVIDIA H200") and lines[-1] == gpu_check.headline(ROWS)
    assert gpu_check.format_table(ROWS) in "\n".join(lines)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["device"] == "NVIDIA H200" and not saved["skipped"] and len(saved["rows"]) == len(ROWS)
    assert saved["headline"] == lines[-1]


@pytest.mark.slow
def test_smoke_study_on_cpu_counts_its_points_and_none_on_a_gpu():
    overrides = ("models=[ViT-Pico/4]", "data.subsets=[256]", "pretrain.steps=2", "evaluate.finetune.steps=1",
                 "resources.gpus_per_worker=0")
    (row,) = gpu_check.smoke_study(400, overrides=overrides)
    assert (row["rc"], row["points"], row["points_on_gpu"]) == (0, 1, 0) and "error" not in row
