"""Run a scaling study: expand the grid, run it with Ray Tune, log to MLflow, write the results and report.

    python -m study.run --grid configs/scaling.yaml [key.path=value ...] [--dry-run [--json]]
                        [--address ray://host:10001] [--out runs] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipelines.config import UserError, to_dict
from study.config import GridPoint, StudyConfig, expand, load_study

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (NVIDIA datasheet)
ASSUMED_MFU = 0.4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m study.run", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="study YAML, e.g. configs/scaling.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pretrain.epochs=3")
    parser.add_argument("--dry-run", action="store_true", help="print the expanded grid and its cost, then exit")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the grid as JSON")
    parser.add_argument("--address", default=None, help="join an existing Ray cluster instead of starting one")
    parser.add_argument("--out", default="runs", help="output root (results, figures, the MLflow store)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in --out)")
    return parser.parse_args(argv)


def describe(points: list[GridPoint]) -> list[dict]:
    return [{"model": p.model, "family": p.family, "subset_size": p.subset_size, "seed": p.seed,
             "steps": p.steps, "examples_seen": p.examples_seen, "pretrain_flops": p.pretrain_flops,
             "h100_hours": p.pretrain_flops / (H100_BF16_PEAK * ASSUMED_MFU) / 3600} for p in points]


def print_grid(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'model':<14} {'subset':>12} {'seed':>4} {'examples seen':>15} {'pretrain FLOPs':>15} {'H100-h':>10}")
    for r in rows:
        print(f"{r['model']:<14} {r['subset_size']:>12,} {r['seed']:>4} {r['examples_seen']:>15,} "
              f"{r['pretrain_flops']:>15.3e} {r['h100_hours']:>10.2f}")
    total = sum(r["pretrain_flops"] for r in rows)
    print(f"{len(rows)} trials, {total:.3e} pretraining FLOPs in all, ~{sum(r['h100_hours'] for r in rows):,.1f} "
          f"H100-hours at {ASSUMED_MFU:.0%} of bf16 peak")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare_data(cfg: StudyConfig) -> None:
    """Generate or check every data source before any trial starts (missing paths fail here)."""
    from pipelines import data

    for src in (cfg.data.pretrain, *cfg.downstream):
        data.prepare(src, cfg.cache_dir, progress=True)


def fig7_side_by_side(finished: list[tuple[dict, dict]], out_dir: Path) -> list[Path]:
    """Per ViT: its Fig 7 panels at the smallest and the largest subset, side by side in one PNG."""
    import numpy as np
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    by_model: dict[str, list[tuple[int, str]]] = {}
    for point, final in finished:
        if final.get("fig7_path") and Path(final["fig7_path"]).exists():
            by_model.setdefault(point["model"], []).append((point["subset_size"], final["fig7_path"]))
    written = []
    for model, items in by_model.items():
        (small, a), (large, b) = min(items), max(items)
        images = [np.asarray(Image.open(p).convert("RGB")) for p in dict.fromkeys([a, b])]
        height = max(im.shape[0] for im in images)
        padded = [np.pad(im, ((0, height - im.shape[0]), (0, 20), (0, 0)), constant_values=255) for im in images]
        path = out_dir / f"fig7_{model.replace('/', '-')}_n{small}_vs_n{large}.png"
        Image.fromarray(np.concatenate(padded, 1)).save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_study(args.grid, args.overrides)
        rows = describe(expand(cfg))
        if args.dry_run:
            print_grid(rows, args.json)
            return 0
        print_grid(rows, as_json=False)
        prepare_data(cfg)
        return launch(cfg, args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def launch(cfg: StudyConfig, args: argparse.Namespace) -> int:
    from analysis import report, results
    from study import tune_runner
    from study.tracking import StudyTracker, default_tracking_uri, ui_command

    root = Path(args.out).resolve()
    out = root / cfg.study / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=False)
    resolved = to_dict(cfg)
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    commit = git_commit()
    (out / "git_commit.txt").write_text(commit + "\n")
    tracking_uri = args.tracking_uri or default_tracking_uri(root)
    tracker = StudyTracker(tracking_uri, cfg.study, root / "mlartifacts")
    tags = {"git_commit": commit, "grid_file": str(Path(args.grid).resolve())}
    tracker.start_parent(f"{cfg.study} {out.name}", resolved, tags, [out / "config.yaml"])
    status = "FAILED"
    try:
        finished, failures = tune_runner.run_grid(cfg, tracker, tags, out / "ray", args.address)
        table = results.build_table([row for point, final in finished
                                     for row in results.records_from_metrics(point, final)])
        results.write(table, out / "results.csv")
        panels = fig7_side_by_side(finished, out / "figures")
        report.write_report(table, out, title=cfg.study, failures=failures, panels=panels)
        for f in (out / "results.csv", out / "report.md", out / "report.html", out / "summary.json"):
            tracker.client.log_artifact(tracker.parent_id, str(f))
        tracker.client.log_artifacts(tracker.parent_id, str(out / "figures"), "figures")
        status = "FINISHED"
    finally:
        tracker.finish(tracker.parent_id, status)
    print(f"\nresults:  {out / 'results.csv'}\nreport:   {out / 'report.md'} (and report.html, summary.json)\n"
          f"figures:  {out / 'figures'}")
    print(f"mlflow:   {ui_command(tracking_uri)}   (experiment '{cfg.study}')")
    if failures:
        print(f"{len(failures)} of {len(finished) + len(failures)} trials failed: " +
              "; ".join(f"{name}: {why}" for name, why in failures.items()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    sys.exit(main())
