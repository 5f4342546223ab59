"""`python -m study.run --grid G --suggest [--budget H] [--mfu X] [--apply FILE]`: what to run next.

Reads the points the planner finds finished (storage, else their MLflow child's record), ranks candidate points by
the expected narrowing of the ViT-vs-BiT interval per GPU-hour (`analysis.suggest`), prices them with the dry
run's cost model, prints the ranking and, with `--apply`, writes the grid extended with the chosen points: the
idempotent runner then trains only those.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace
from pathlib import Path

import pandas as pd
import yaml

from pipelines.config import UserError, to_dict
from study.config import GridPoint, StudyConfig, expand, grid_point


def study_table(cfg: StudyConfig, points: list[GridPoint], args: argparse.Namespace) -> pd.DataFrame:
    """The results table of the grid's finished points, from what the plan reads (nothing is written)."""
    from study.identity import eval_ids
    from study.run import read_plan, results_table

    decisions, tracker = read_plan(cfg, points, args)
    evals, records = eval_ids(cfg), {}
    for d in decisions:
        record = d.record
        if d.action == "reuse" and (record is None or record.stale(evals)) and tracker is not None:
            record = tracker.fetch_record(d.child) or record  # finished on another machine: its logged record
        if record is not None:
            records[d.point.id] = record
    return results_table(cfg, points, records, evals)


def pick_target(table: pd.DataFrame, headline: str) -> tuple[tuple, pd.DataFrame, str, str]:
    """The first (ViT or hybrid, BiT) pair on the evaluation the study's verdict reads (`analysis.verdict.headline`:
    5-shot top-1 where measured), else on the first evaluation of the headline dataset (else of any)."""
    from analysis.fits import accuracy_rows
    from analysis.intervals import GROUP, model_pairs
    from analysis.verdict import headline as verdict_key
    from analysis.verdict import key_rows

    rows = accuracy_rows(table)
    if (key := verdict_key(table)) is not None:
        frame = key_rows(rows, key)
        if pairs := model_pairs(frame):
            return key, frame, *pairs[0]
    groups = sorted(rows.groupby(GROUP, dropna=False), key=lambda kv: kv[0][1] != headline)
    for key, frame in groups:
        if pairs := model_pairs(frame):
            return key, frame, *pairs[0]
    raise UserError("--suggest: no ViT/BiT pair measured on one evaluation yet; run the grid first")


def extended(cfg: StudyConfig, chosen: list) -> StudyConfig:
    """The grid with the chosen candidates' subset sizes and seeds added."""
    sizes = sorted({*cfg.data.subsets, *(s.candidate.value for s in chosen if s.candidate.kind == "size")})
    seeds = (*cfg.seeds, *sorted(s.candidate.value for s in chosen if s.candidate.kind == "seed"))
    return replace(cfg, data=replace(cfg.data, subsets=tuple(sizes)), seeds=seeds)


def same_place(args) -> str:
    """The flags that find this study's finished points (`--out`, `--storage`, `--tracking-uri`, as given): a run
    of the extended grid without them would train every point anew, elsewhere."""
    given = (("--out", args.out if args.out != "runs" else None), ("--storage", args.storage),
             ("--tracking-uri", args.tracking_uri))
    return "".join(f" {flag} {shlex.quote(value)}" for flag, value in given if value)


def write_grid(cfg: StudyConfig, path: Path, source: str, place: str = "") -> None:
    header = (f"# {cfg.study}: {source} extended by `python -m study.run --grid {source} --suggest --apply`.\n"
              f"# Run: python -m study.run --grid {path}{place}  (points already finished are reused; only new ones "
              "train)\n")
    path.write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def print_table(where: str, target, suggestions: list) -> None:
    what = ("the crossover's 95% interval" if target.kind == "crossover" else
            f"the 95% interval of BiT - ViT at {target.at:,.0f} examples (no crossover resolved)")
    print(f"{where}: {what} is {target.width:.3g} {target.unit} wide now")
    print(f"{'':1} {'model':<24} {'subset size':>14} {'seed':>8} {'GPU-h':>9} {'width after':>12} "
          f"{'per GPU-h':>10}  reason")
    for s in suggestions:
        c = s.candidate
        models = ", ".join(dict.fromkeys(m for m, _, _ in c.points))
        sizes = sorted({n for _, n, _ in s.points or c.points})
        size = f"{c.value:,}" if c.kind == "size" else f"{sizes[0]:,}..{sizes[-1]:,}"
        seeds = ",".join(str(x) for x in sorted({x for _, _, x in c.points}))
        more = len(s.points) - len(c.points)  # a seed at the sizes chosen with it, or a size for the seeds
        reason = c.reason + (f"; {len(s.points)} with the {'sizes' if c.kind == 'seed' else 'seed'} chosen"
                             f"{'' if s.chosen else ' (if added)'}" if more else "")
        gain = f"{s.per_gpu_hour:.3g}" if s.reduction > 0 else "widens" if s.reduction < 0 else "none"
        print(f"{'*' if s.chosen else ' '} {models:<24} {size:>14} {seeds:>8} {s.gpu_hours:>9.3g} "
              f"{s.width_after:>12.3g} {gain:>10}  {reason}")
    spent = sum(s.gpu_hours for s in suggestions if s.chosen)
    chosen = f"* chosen: {spent:.3g} GPU-hours" if spent else "none chosen: no candidate narrows it"
    print(f"{chosen}. width after: the interval's expected width ({target.unit}), a mean over simulated outcomes; "
          "per GPU-h: its expected narrowing per GPU-hour (widens: the simulated interval is wider after)")


def caveats(frame: pd.DataFrame, key: tuple, vit: str, bit: str, target) -> list[str]:
    """What the ranking rests on that the data do not support, as the verdict says it: the fitted laws it
    simulates from, where degenerate (`analysis.verdict.degenerate_fits`); and, ranking a gap, how the interval it
    narrows (the laws' seed bootstrap) compares with the verdict's (a t interval over the paired seeds), which with
    few seeds is wider."""
    from analysis import fits, intervals, verdict

    rows, _ = fits.fit_table(frame[frame["model"].isin([vit, bit])])
    out = [f"{c}; the widths above are simulated from it, so read the ranking as a rough guide"
           for c in verdict.degenerate_fits(rows, key)]
    if target.kind == "gap":
        n = frame["subset_size"].max()
        at = frame[frame["subset_size"] == n]
        g = intervals.gap(intervals.per_seed(at[at["model"] == bit]), intervals.per_seed(at[at["model"] == vit]))
        if g["ci"] is not None and (width := g["ci"][1] - g["ci"][0]) > target.width:
            out.append(f"the verdict's interval of BiT - ViT at {n:,.0f} is {width:.3g} points wide (a t interval, "
                       f"{g['method']}); the {target.width:.3g} above (at {target.at:,.0f}) is the fitted laws' seed "
                       "bootstrap, narrower with few seeds, which a simulated seed can widen")
    return out


class PointCost:
    """A grid point's GPU-hours, from the dry run's cost model (`study.cost`): pretraining and fine-tuning, each at
    the pace of the slower of the GPUs and the loader."""

    def __init__(self, cfg: StudyConfig, mfu: float):
        self.cfg, self.mfu = cfg, mfu

    def __call__(self, model: str, subset_size: int, seed: int) -> float:
        from study.cost import describe

        point = grid_point(self.cfg, model, subset_size, seed)
        return describe(self.cfg, [point], {}, self.mfu)[0]["bound_h100_hours"]


def run_suggest(cfg: StudyConfig, points: list[GridPoint], args: argparse.Namespace, mfu: float) -> int:
    """Rank, print and (with `--apply FILE`) write the extended grid; 0 on success."""
    from analysis import suggest

    if args.budget is not None and args.budget <= 0:
        raise UserError(f"--budget {args.budget}: GPU-hours, a positive number")
    table = study_table(cfg, points, args)
    key, frame, vit, bit = pick_target(table, cfg.downstream[0].label)
    try:
        target, ranked = suggest.suggest(frame, vit, bit, cfg.data.pretrain.size - cfg.holdout,  # the subsets' pool
                                         PointCost(cfg, mfu), args.budget)
    except ValueError as err:
        raise UserError(f"--suggest: {err}") from err
    shots = "" if pd.isna(key[2]) else f" {int(key[2])}-shot"
    print_table(f"{vit} vs {bit} on {key[0]}{shots} {key[1]} ({key[3]}), H100-hours at {mfu:.0%} MFU", target,
                ranked)
    for caveat in caveats(frame, key, vit, bit, target):
        print(f"caveat: {caveat}")
    chosen = [s for s in ranked if s.chosen]
    if args.apply:
        if not chosen:
            raise UserError("--apply: no candidate narrows the interval within the budget; nothing written")
        place, grid = same_place(args), extended(cfg, chosen)
        write_grid(grid, Path(args.apply), args.grid, place)
        print(f"wrote {args.apply}: python -m study.run --grid {args.apply}{place} trains only the new points")
        have = {(p.model, p.subset_size, p.seed) for p in points}
        new = [(p.model, p.subset_size, p.seed) for p in expand(grid) if (p.model, p.subset_size, p.seed) not in have]
        priced = sum(len(s.points) for s in chosen)
        if len(new) != priced:  # the ranking crosses the measured sizes and seeds only: a new seed also runs at the
            # grid's sizes not measured yet
            cost = PointCost(cfg, mfu)
            hours = sum(cost(*p) for p in new)
            over = f", over the --budget of {args.budget:g}" if args.budget is not None and hours > args.budget else ""
            print(f"note: the written grid adds {len(new)} points, not the {priced} priced above: {hours:.3g} "
                  f"GPU-hours{over}")
    return 0


def check_apply(path: str, grid: str) -> None:
    """`--apply FILE` can be written, checked before any ranking: a new file in an existing folder, not the grid
    read (nor any file that exists: what it holds would be replaced)."""
    target = Path(path)
    if target.exists() and target.resolve() == Path(grid).resolve():
        raise UserError(f"--apply {path} is the --grid file: the extended grid goes into a new file, beside it")
    if target.is_dir():
        raise UserError(f"--apply {path} is a folder: give the new grid file's path, e.g. {target / 'next.yaml'}")
    if target.exists():
        raise UserError(f"--apply {path} exists: give a new file name (what it holds would be replaced)")
    if not target.parent.is_dir():
        raise UserError(f"--apply {path}: the folder {target.parent} does not exist")


if __name__ == "__main__":  # `python -m study.suggest ARGS` is `python -m study.run --suggest ARGS`
    import sys

    from study.cli import exit_now
    from study.run import main

    exit_now(main(["--suggest", *sys.argv[1:]]))
