"""`--suggest` on a study whose storage holds finished points: the ranking is printed, `--apply` writes a grid that
`--dry-run` accepts and that plans only the new points."""

import yaml

from pipelines.downstream import Measurement
from study.config import expand, load_study
from study.identity import eval_ids
from study.protocol import EvalRecord, PointFields, PointRecord, PretrainSummary, eval_kind
from study.storage import PointFiles, Storage
from tests.conftest import ROOT

SIZES, SEEDS = "data.subsets=[64, 256, 1024]", "seeds=[0, 1, 2]"
TRUTH = {"ViT": (900.0, 0.5, 10.0), "BiT": (120.0, 0.25, 20.0)}  # err = a * n^-b + c; they cross near n = 350


def _finished_study(tmp_path, monkeypatch, cache_dir):
    """The smoke grid at 3 sizes x 3 seeds, each point's record in storage with a finetune accuracy from the laws."""
    import numpy as np

    monkeypatch.setenv("VITSCALE_CACHE", str(cache_dir))
    cfg = load_study(ROOT / "configs" / "smoke.yaml", [SIZES, SEEDS])
    evals, rng = eval_ids(cfg), np.random.default_rng(0)
    storage = Storage(str(tmp_path / "runs" / cfg.study / "storage"))
    for p in expand(cfg):
        a, b, c = TRUTH[p.family]
        acc = 100.0 - (a * p.subset_size**-b + c) + rng.normal(0.0, 0.5)
        measurement = Measurement("finetune", cfg.downstream[0].label, None, "top1", float(acc))
        record = PointRecord(p.id, PointFields(**p.table_fields), PretrainSummary(p.steps, p.examples_seen, 1.0, 0),
                             {key: EvalRecord(ident, [measurement] if eval_kind(key) == "finetune" else [])
                              for key, ident in evals.items()})
        storage.write_bytes(PointFiles(p.id).record, record.to_json().encode())
    return cfg


def test_suggest_prints_the_ranking_and_apply_plans_only_the_new_points(tmp_path, monkeypatch, cache_dir, capsys):
    from study.run import main

    cfg = _finished_study(tmp_path, monkeypatch, cache_dir)
    out, grid = ["--out", str(tmp_path / "runs")], tmp_path / "next.yaml"
    code = main(["--grid", str(ROOT / "configs" / "smoke.yaml"), SIZES, SEEDS, *out, "--suggest", "--budget", "1",
                 "--apply", str(grid)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "ViT-Pico/4 vs BiT-R14-Pico on finetune" in printed and "GPU-h" in printed
    rows = [line for line in printed.splitlines() if "points (every model" in line]
    assert len(rows) == 4 and any(line.startswith("*") for line in rows)  # 2 midpoints, 2x = the source, a seed
    assert "128" in printed and "512" in printed and "2,048" in printed
    run = f"python -m study.run --grid {grid} --out {tmp_path / 'runs'}"  # where the finished points are found
    assert f"wrote {grid}: {run} trains only the new points" in printed and f"# Run: {run}  (" in grid.read_text()

    new = load_study(grid)
    assert set(new.data.subsets) >= set(cfg.data.subsets) and set(new.seeds) >= set(cfg.seeds)
    added = {p.id for p in expand(new)} - {p.id for p in expand(cfg)}
    assert added and yaml.safe_load(grid.read_text())["study"] == cfg.study

    assert main(["--grid", str(grid), *out, "--dry-run", "--json"]) == 0
    import json

    actions = {r["id"]: r["action"] for r in json.loads(capsys.readouterr().out)}
    assert {i for i, a in actions.items() if a == "train"} == added  # the finished points are only logged
    assert all(a == "log" for i, a in actions.items() if i not in added)


def test_apply_says_what_the_written_grid_adds_beyond_the_priced_candidates(tmp_path, monkeypatch, cache_dir, capsys):
    """A grid crosses every seed with every size: a new seed chosen with new sizes also runs at those sizes, which no
    candidate priced alone (the 24 points priced become 30); `--apply` says so, with their cost against --budget."""
    from study.run import main

    cfg = _finished_study(tmp_path, monkeypatch, cache_dir)
    grid = tmp_path / "next.yaml"
    code = main(["--grid", str(ROOT / "configs" / "smoke.yaml"), SIZES, SEEDS, "--out", str(tmp_path / "runs"),
                 "--suggest", "--budget", "0.01", "--apply", str(grid)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    chosen = [line for line in printed.splitlines() if line.startswith("*") and "points (every model" in line]
    assert len(chosen) == 4 and any("one more seed" in line for line in chosen)  # a seed with three new sizes
    added = len({p.id for p in expand(load_study(grid))} - {p.id for p in expand(cfg)})
    assert added == 30
    assert ("note: the grid crosses every seed with every size, so it adds 30 points, not the 24 priced above: "
            "0.0111 GPU-hours, over the --budget of 0.01") in printed
