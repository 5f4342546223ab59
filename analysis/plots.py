"""Paper-style figures from the tidy results table (seaborn; PNG + PDF each).

Fig 3 analog: fine-tune accuracy vs pretraining data, a shaded band per family's range. Fig 4 analog: linear
few-shot accuracy vs subset size with the fitted laws and the crossovers marked. Fig 5 analog: accuracy vs
pretraining compute with the Pareto frontier. Fit diagnostics: fitted/held-out prediction vs measured.
One colour per model, one marker per family, log x. Every point is the mean over seeds with its 95% t interval
(`analysis.intervals`, the numbers the report's tables and `summary.json` give).
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis import intervals  # noqa: E402
from analysis.fits import Fit, accuracy_rows  # noqa: E402
from pipelines import atomic, families  # noqa: E402


def _style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def _palette(models: list[str]) -> dict[str, tuple]:
    colours = sns.color_palette("tab10", n_colors=max(10, len(models)))
    return {m: colours[i] for i, m in enumerate(sorted(models))}


def _short(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}" if n >= 100 else f"{n:.3g}"  # a crossover's estimate is a fractional size: 880, not 879.824


def _size_axis(ax, sizes) -> None:
    ax.set_xscale("log")
    ax.set_xticks(sizes, [_short(v) for v in sizes], minor=False)
    ax.minorticks_off()
    ax.set_xlabel("pretraining examples (subset size)")


def _lineplot(ax, frame: pd.DataFrame, palette: dict) -> None:
    present = [f for f in families.names() if f in set(frame["family"])]  # the table's order, in every legend
    sns.lineplot(data=frame, x="subset_size", y="value", hue="model", style="family", style_order=present,
                 markers={f: families.get(f).marker for f in present}, dashes=False, palette=palette,
                 errorbar=intervals.accuracy_errorbar, err_style="bars", err_kws={"capsize": 3}, ax=ax, markersize=7)
    ax.set_ylabel("top-1 accuracy (%)")


def _family_bands(ax, frame: pd.DataFrame) -> None:
    means = frame.groupby(["family", "model", "subset_size"])["value"].mean().reset_index()
    for family, group in means.groupby("family"):
        if group["model"].nunique() < 2:
            continue
        span = group.groupby("subset_size")["value"].agg(["min", "max"])
        ax.fill_between(span.index, span["min"], span["max"], color=families.get(family).colour, alpha=0.25,
                        lw=0, label=f"{families.get(family).label} range")


def _chance(ax, frame: pd.DataFrame) -> None:
    """A dashed line at the panel's chance top-1 (the `chance` column: 100 / classes), where it is known."""
    chance = frame["chance"].dropna() if "chance" in frame else pd.Series(dtype=float)
    if len(chance):
        ax.axhline(float(chance.iloc[0]), color="0.45", ls="--", lw=1, zorder=0, label="chance")


def _fitted_curves(ax, frame: pd.DataFrame, key: tuple, fits: dict, palette: dict,
                   reach: tuple[float, float] | None = None) -> None:
    """Each model's fitted law over the measured sizes, or over `reach` (the sizes out to a crossover marked beyond
    them: the dashed laws meet at the dotted line)."""
    lo, hi = reach or (frame["subset_size"].min(), frame["subset_size"].max())
    sizes = np.geomspace(lo, hi, 100)
    for model in frame["model"].unique():
        fit: Fit | None = fits.get((model, *key))
        if fit is not None:
            ax.plot(sizes, fit.accuracy(sizes), ls="--", lw=1, color=palette[model], alpha=0.8)


def _marked(key: tuple, crossovers: list[dict], lo: float, hi: float) -> list[dict]:
    """The panel's crossovers that are drawn: within 10x of its measured sizes."""
    return [c for c in crossovers if (c["eval"], c["dataset"], c["shots"], c["metric"]) == key
            and c["estimate"] is not None and lo / 10 <= c["estimate"] <= hi * 10]


def _mark_crossovers(ax, marked: list[dict], hi: float) -> None:
    """A dotted line at each crossover, labelled inside the axes (left of the line where it is past the sizes)."""
    for c in marked:
        ax.axvline(c["estimate"], color="k", ls=":", lw=1)
        right = c["estimate"] > hi
        ax.annotate(f"{c['status']}\n{_short(c['estimate'])}", (c["estimate"], 0.02),
                    xycoords=ax.get_xaxis_transform(), xytext=(-3 if right else 3, 3), textcoords="offset points",
                    ha="right" if right else "left", fontsize=7)


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.tight_layout()
    write_figure(fig, paths[0], dpi=200)
    write_figure(fig, paths[1])
    plt.close(fig)
    return paths


def write_figure(fig, path: Path, **savefig) -> None:
    """`fig.savefig(path)` whole or not at all (`atomic.write_bytes`): a driver killed while drawing leaves no
    half-written image, which a rerun would take for a finished one (a Fig 7 panel is drawn once, by name)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix[1:], **savefig)
    atomic.write_bytes(path, buf.getvalue())


def _key(evaluation: str, dataset: str, shots, metric: str = "top1") -> tuple:
    return evaluation, dataset, None if pd.isna(shots) else int(shots), metric


PANELS_PER_ROW = 3  # wider figures shrink to the report's column and their text with them


def _panels(frame: pd.DataFrame, by: list[str]):
    groups = list(frame.groupby(by, dropna=False))
    cols = min(len(groups), PANELS_PER_ROW)
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(3.6 * cols + 1.6, 3.4 * rows))
    for ax in axes.flat[len(groups):]:
        ax.remove()
    return fig, list(zip(axes.flat, groups, strict=False))


def _legend(fig, axes, fontsize: float | None = None) -> None:
    """One legend, right of the last panel, naming every entry of every panel once (a model or study drawn in some
    panels only is named, wherever it is missing: the last panel's own legend named only what it drew)."""
    entries: dict[str, object] = {}
    for ax in axes:
        legend = ax.get_legend()
        if legend is not None:  # seaborn's: its handles (hue and style, with their headers)
            pairs = zip(legend.legend_handles, (t.get_text() for t in legend.get_texts()), strict=True)
            legend.remove()
        else:  # matplotlib's labelled artists (errorbar containers keep their markers)
            pairs = zip(*ax.get_legend_handles_labels(), strict=True)
        for handle, label in pairs:
            entries.setdefault(label, handle)
    axes[-1].legend(list(entries.values()), list(entries), loc="upper left", bbox_to_anchor=(1.02, 1),
                    frameon=False, fontsize=fontsize)


def fig_vs_data(table: pd.DataFrame, evaluation: str, out_dir: Path, name: str, title: str, fits: dict,
                crossovers: list[dict]) -> list[Path]:
    frame = table[(table["eval"] == evaluation) & (table["metric"] == "top1")]
    if frame.empty:
        return []
    palette = _palette(list(frame["model"].unique()))
    fig, panels = _panels(frame, ["dataset", "shots"])
    for ax, ((dataset, shots), group) in panels:
        key = _key(evaluation, dataset, shots)
        _family_bands(ax, group)
        _chance(ax, group)
        _lineplot(ax, group, palette)
        lo, hi = group["subset_size"].min(), group["subset_size"].max()
        marked = _marked(key, crossovers, lo, hi)
        reach = (min([lo, *(c["estimate"] for c in marked)]), max([hi, *(c["estimate"] for c in marked)]))
        _fitted_curves(ax, group, key, fits, palette, reach)
        _mark_crossovers(ax, marked, hi)
        _size_axis(ax, sorted(group["subset_size"].unique()))
        ax.set_title(f"{dataset}" + ("" if pd.isna(shots) else f", {int(shots)}-shot"))
    _legend(fig, [ax for ax, _ in panels])
    fig.suptitle(title)
    return _save(fig, out_dir, name)


def _spread(sizes: list[float], ratio: float = 8.0) -> list[float]:
    """Tick positions at least `ratio` apart (studies' sizes interleave and their labels would overlap)."""
    ticks = sizes[:1]
    for n in sizes[1:]:
        if n >= ticks[-1] * ratio:
            ticks.append(n)
    return ticks


def fig_studies_vs_data(points: pd.DataFrame, evaluation: str, studies: list[str], out_dir: Path) -> list[Path]:
    """Several studies on one evaluation protocol: a panel per (dataset, shots, metric), one colour per study,
    one marker per family, one line style per model within a study. A study without a panel's evaluation is
    named in the panel as missing.

    Args:
        points: `intervals.point_table` rows of every study, with a `study` column.
        studies: every study's label, in legend order.
    """
    frame = points[points["eval"] == evaluation]
    if frame.empty:
        return []
    _style()
    colour = dict(zip(studies, sns.color_palette("tab10", n_colors=max(10, len(studies))), strict=False))
    fig, panels = _panels(frame, ["dataset", "shots", "metric"])
    for ax, ((dataset, shots, metric), group) in panels:
        for study in studies:
            mine = group[group["study"] == study]
            for i, ((model, family), pts) in enumerate(mine.groupby(["model", "family"])):
                pts = pts.sort_values("subset_size")
                lo, hi = pts["ci_low"].fillna(pts["mean"]), pts["ci_high"].fillna(pts["mean"])
                ax.errorbar(pts["subset_size"], pts["mean"], yerr=[pts["mean"] - lo, hi - pts["mean"]],
                            color=colour[study], marker=families.get(family).marker, ls=("-", "--", ":", "-.")[i % 4],
                            capsize=3, label=_plain(f"{study}: {model}"))
        missing = [s for s in studies if s not in set(group["study"])]
        if missing:
            ax.text(0.02, 0.98, _plain("missing: " + ", ".join(missing)), transform=ax.transAxes, va="top",
                    fontsize=7)
        _size_axis(ax, _spread(sorted(group["subset_size"].unique())))
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{dataset}" + ("" if pd.isna(shots) else f", {int(shots)}-shot"))
    _legend(fig, [ax for ax, _ in panels], fontsize=7)
    fig.suptitle(f"{evaluation}: accuracy vs pretraining data, by study")
    return _save(fig, out_dir, f"compare_{evaluation}")


def fig_vs_compute(table: pd.DataFrame, out_dir: Path, pareto: list[dict], points: pd.DataFrame) -> list[Path]:
    frame = points[(points["metric"] == "top1") & points["pretrain_flops"].notna()]
    frame = frame[frame["shots"].isna() | frame["shots"].eq(5).fillna(False)]  # per-k evaluations: at 5 shots
    if frame.empty:
        return []
    palette = _palette(list(frame["model"].unique()))
    fig, panels = _panels(frame, ["eval", "dataset"])
    for ax, ((evaluation, dataset), group) in panels:
        for (model, family), pts in group.groupby(["model", "family"]):
            lo, hi = pts["ci_low"].fillna(pts["mean"]), pts["ci_high"].fillna(pts["mean"])
            ax.errorbar(pts["pretrain_flops"], pts["mean"], yerr=[pts["mean"] - lo, hi - pts["mean"]], ls="none",
                        marker=families.get(family).marker, color=palette[model], capsize=3, label=model)
        shots = 5 if group["shots"].notna().any() else None
        _chance(ax, table[(table["eval"] == evaluation) & (table["dataset"] == dataset) & (table["metric"] == "top1")])
        for entry in pareto:
            if (entry["eval"], entry["dataset"], entry["shots"], entry["metric"]) == (evaluation, dataset, shots,
                                                                                        "top1"):
                pts = entry["points"]
                ax.step([p["pretrain_flops"] for p in pts], [p["value"] for p in pts], where="post", color="k",
                        lw=1, alpha=0.6, label="frontier")
        ax.legend()
        ax.set_xscale("log")
        ax.set_xlabel("pretraining compute (FLOPs)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{evaluation}{'' if shots is None else f' ({shots}-shot)'} / {dataset}")
    _legend(fig, [ax for ax, _ in panels])
    fig.suptitle("Accuracy vs pretraining compute, with the Pareto frontier (Fig 5 analog)")
    return _save(fig, out_dir, "fig5_accuracy_vs_compute")


def fig_fit_diagnostics(table: pd.DataFrame, out_dir: Path, extrapolation: list[dict], fits: dict) -> list[Path]:
    """Fitted value vs measured value at every size, and the held-out prediction of the largest size
    (`fits.extrapolation_table` rows)."""
    points, held, bars = [], [], []
    for (model, evaluation, dataset, shots, metric), fit in fits.items():
        sel = table[(table["model"] == model) & (table["eval"] == evaluation) & (table["dataset"] == dataset)
                    & (table["metric"] == metric)]
        sel = sel[sel["shots"].isna()] if shots is None else sel[sel["shots"] == shots]
        for n, group in sel.groupby("subset_size"):  # measured: the mean over seeds and its interval
            mean, lo, hi = intervals.mean_interval(intervals.per_seed(group).to_numpy())
            points.append((mean, float(fit.accuracy(n))))
            bars.append((mean - (mean if lo is None else lo), (mean if hi is None else hi) - mean))
    held = [(r["measured"], r["predicted"]) for r in extrapolation if r["predicted"] is not None]
    if not points:
        return []
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    measured, predicted = zip(*points, strict=True)
    ax.errorbar(measured, predicted, xerr=np.array(bars).T, ls="none", marker="o", ms=4, alpha=0.6, capsize=2,
                label="fit (all sizes); bar: 95% interval over seeds")
    if held:
        ax.scatter(*zip(*held, strict=True), s=60, marker="*", color="C3", label="held-out largest size")
    lims = [min(min(p) for p in points + held) - 2, max(max(p) for p in points + held) + 2]
    ax.plot(lims, lims, color="k", lw=0.8, ls=":")
    ax.set(xlim=lims, ylim=lims, xlabel="measured accuracy (%)", ylabel="predicted accuracy (%)")
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("Fit diagnostics" + ("" if held else " (no held-out check: < 4 sizes)"), fontsize=10)
    return _save(fig, out_dir, "fit_diagnostics")


def plot_all(table: pd.DataFrame, out_dir: Path, extrapolation: list[dict] | None = None, fits: dict | None = None,
             crossovers: list[dict] | None = None, pareto: list[dict] | None = None,
             points: pd.DataFrame | None = None, compute: bool = True) -> list[Path]:
    """Draw every figure the table supports into `out_dir`; returns the written files. `compute`: draw accuracy
    vs compute (Fig 5), which says nothing when every model spends one compute at every size."""
    _style()
    points = intervals.point_table(accuracy_rows(table)) if points is None else points
    out_dir.mkdir(parents=True, exist_ok=True)
    fits, crossovers, pareto, extrapolation = fits or {}, crossovers or [], pareto or [], extrapolation or []
    return [*fig_vs_data(table, "finetune", out_dir, "fig3_finetune_vs_data",
                         "Fine-tuning accuracy vs pretraining data (Fig 3 analog)", fits, crossovers),
            *fig_vs_data(table, "fewshot", out_dir, "fig4_fewshot_vs_data",
                         "Linear few-shot accuracy vs pretraining data (Fig 4 analog)", fits, crossovers),
            *(fig_vs_compute(table, out_dir, pareto, points) if compute else []),
            *fig_fit_diagnostics(table, out_dir, extrapolation, fits),
            *fig7_across_grid(table, out_dir)]


def _mosaic(tiles: np.ndarray, cols: int, gap: int = 1) -> np.ndarray:
    """Tiles [n, h, w, ...] laid out row-major on a `cols`-wide grid, `gap` pixels of NaN between them (drawn as
    the background): one image, so a grid of 64 tiles is one imshow instead of 64 axes."""
    n, h, w = tiles.shape[:3]
    rows = -(-n // cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, *tiles.shape[3:]), np.nan)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return out


def fig7_panels(diag, path: Path, title: str) -> Path:
    """One ViT's Fig 7: patch-filter principal components, position-embedding similarity, attention distance."""
    _style()
    fig = plt.figure(figsize=(12, 4))
    left, centre, right = fig.subfigures(1, 3, width_ratios=[1.2, 1, 1])
    if diag.filters is None:
        left.text(0.5, 0.5, "no RGB patch filters\n(hybrid: a ResNet embeds the patches)", ha="center")
    else:
        comps = diag.filters
        lo, hi = comps.min((1, 2, 3), keepdims=True), comps.max((1, 2, 3), keepdims=True)
        shown = (comps - lo) / np.maximum(hi - lo, 1e-12)  # each component min-max scaled, as the paper shows them
        ax = left.subplots()
        ax.imshow(np.nan_to_num(_mosaic(shown, cols=7), nan=1.0), interpolation="nearest")  # white gaps
        ax.axis("off")
        left.suptitle(f"Patch-filter PCA (top {len(shown)})", fontsize=10)
    g = diag.posemb_sim.shape[0]
    ax = centre.subplots()
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    ax.imshow(_mosaic(diag.posemb_sim.reshape(g * g, g, g), cols=g), vmin=-1, vmax=1, cmap=cmap,
              interpolation="nearest")
    ax.axis("off")
    centre.suptitle(f"Position-embedding similarity (locality {diag.metrics['posemb_locality']:.2f})",
                    fontsize=10)
    ax = right.subplots()
    layers = np.arange(1, len(diag.attn_distance) + 1)
    for head in range(diag.attn_distance.shape[1]):
        ax.scatter(layers, diag.attn_distance[:, head], s=14, alpha=0.8)
    if (uniform := diag.metrics.get("attn_dist_uniform")) is not None:
        ax.axhline(uniform, color="k", ls=":", lw=1.2, label="uniform attention")
        ax.legend(frameon=False, fontsize=8)
    ax.set(xlabel="network depth (layer)", ylabel="mean attention distance (pixels)", xticks=layers)
    right.suptitle("Attention distance per head", fontsize=10)
    fig.suptitle(title, y=1.02)
    write_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def fig7_across_grid(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Does the ViT learn locality with more data? Attention distance per layer (one line per subset), the
    lowest layer's mean/min distance and the position-embedding locality vs subset size; the ResNets'
    theoretical receptive field per stage on the same pixel axis."""
    diag = table[table["eval"] == "diagnostics"]
    vit = diag[diag["family"].isin(families.with_diagnostic("attention"))]
    if vit.empty:
        return []
    _style()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    layers = vit[vit["metric"].str.match(r"attn_dist_layer\d+_mean")].copy()
    layers["layer"] = layers["metric"].str.extract(r"layer(\d+)_")[0].astype(int)
    layers["subset"] = layers["subset_size"].map(lambda n: _short(float(n)))
    sns.lineplot(data=layers, x="layer", y="value", hue="subset", style="model", marker="o", ax=axes[0],
                 errorbar=intervals.errorbar, err_style="bars", palette="viridis")
    resnets = diag["family"].isin(families.with_diagnostic("receptive_field"))
    rf = diag[resnets & diag["metric"].str.startswith("rf_stage")]
    for model, group in rf.groupby("model"):
        stages = group.groupby("metric")["value"].mean().sort_index()
        x = np.linspace(1, max(layers["layer"].max(), 2), len(stages))
        axes[0].plot(x, stages.to_numpy(), ls="--", color="0.5", lw=1, label=f"{model} receptive field")
    uniform = vit[vit["metric"] == "attn_dist_uniform"].groupby("model")["value"].mean()
    for ax in axes[:2]:
        for model, level in uniform.items():
            ax.axhline(level, color="k", ls=":", lw=1.2, label=f"{model} uniform attention")
    axes[0].set(xlabel="layer (ResNet: stages spread over the same depth)", ylabel="pixels",
                title="Mean attention distance per layer")
    axes[0].legend(fontsize=7, frameon=False)
    low = vit[vit["metric"].isin(["attn_dist_layer1_mean", "attn_dist_layer1_min"])]
    sns.lineplot(data=low, x="subset_size", y="value", hue="model", style="metric", marker="o", ax=axes[1],
                 errorbar=intervals.errorbar, err_style="bars")
    _size_axis(axes[1], sorted(low["subset_size"].unique()))
    axes[1].set(ylabel="pixels", title="Layer 1 attention distance (mean, min head)")
    loc = vit[vit["metric"] == "posemb_locality"]
    sns.lineplot(data=loc, x="subset_size", y="value", hue="model", marker="o", ax=axes[2],
                 errorbar=intervals.errorbar, err_style="bars")
    _size_axis(axes[2], sorted(loc["subset_size"].unique()))
    axes[2].set(ylabel="Spearman(similarity, −distance)", title="Position-embedding locality")
    fig.suptitle("What the ViT learned as pretraining data grows (Fig 7 analog)")
    return _save(fig, out_dir, "fig7_vit_diagnostics_vs_data")


def fig7_side_by_side(panels: dict[str, list[tuple[int, Path]]], out_dir: Path) -> list[Path]:
    """Per model, its Fig 7 panels (`fig7_panels` PNGs) at the smallest and the largest subset in one PNG, the
    smallest above the largest (each keeps its own width, so its text reads at the size it was drawn: two side by
    side were twice a page's width and shrank to half), with the panels' dpi, which the report sizes it by.
    `panels`: {model: [(subset size, PNG path)]}."""
    from PIL import Image

    written = []
    for model, items in panels.items():
        (small, a), (large, b) = min(items), max(items)
        opened = [Image.open(p) for p in dict.fromkeys([a, b])]
        dpi = opened[0].info.get("dpi")
        images = [np.asarray(im.convert("RGB")) for im in opened]
        width = max(im.shape[1] for im in images)
        padded = [np.pad(im, ((0, 20), (0, width - im.shape[1]), (0, 0)), constant_values=255) for im in images]
        path = out_dir / f"fig7_{model.replace('/', '-')}_n{small}_vs_n{large}.png"
        buf = io.BytesIO()
        Image.fromarray(np.concatenate(padded, 0)[:-20]).save(buf, format="PNG", **({"dpi": dpi} if dpi else {}))
        atomic.write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def _plain(text: str) -> str:
    """A user's label as written: matplotlib reads text between two '$' as math (and fails on what it cannot parse)."""
    return text.replace("$", r"\$")
