"""Paper-style figures from the tidy results table (seaborn; PNG + PDF each).

Fig 3 analog: fine-tune accuracy vs pretraining data. Fig 4 analog: linear few-shot accuracy vs subset size.
Fig 5 analog: accuracy vs pretraining compute. One colour per model, one marker per family, log x.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

FAMILY_MARKERS = {"ViT": "o", "BiT": "s", "Hybrid": "^"}


def _style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def _palette(models: list[str]) -> dict[str, tuple]:
    colours = sns.color_palette("tab10", n_colors=max(10, len(models)))
    return {m: colours[i] for i, m in enumerate(sorted(models))}


def _lineplot(ax, frame: pd.DataFrame, x: str, palette: dict) -> None:
    sns.lineplot(data=frame, x=x, y="value", hue="model", style="family", markers=FAMILY_MARKERS,
                 dashes=False, palette=palette, errorbar=("sd") if frame["seed"].nunique() > 1 else None,
                 ax=ax, markersize=7)
    ax.set_xscale("log")
    ax.set_ylabel("top-1 accuracy (%)")
    if x == "subset_size":  # label the sizes actually measured
        sizes = sorted(frame[x].unique())
        ax.set_xticks(sizes, [_short(v) for v in sizes], minor=False)
        ax.minorticks_off()


def _short(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:g}{suffix}"
    return f"{n:g}"


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=200)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def _panels(frame: pd.DataFrame, by: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    return [((k,) if not isinstance(k, tuple) else k, g) for k, g in frame.groupby(by, dropna=False)]


def fig_vs_data(table: pd.DataFrame, evaluation: str, out_dir: Path, name: str, title: str) -> list[Path]:
    frame = table[(table["eval"] == evaluation) & (table["metric"] == "top1")]
    if frame.empty:
        return []
    by = ["dataset", "shots"] if evaluation == "fewshot" else ["dataset"]
    panels = _panels(frame, by)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.4, 3.4), squeeze=False)
    palette = _palette(list(frame["model"].unique()))
    for ax, (key, group) in zip(axes[0], panels, strict=True):
        _lineplot(ax, group, "subset_size", palette)
        ax.set_xlabel("pretraining examples (subset size)")
        ax.set_title(f"{key[0]}" + (f", {key[1]}-shot" if len(key) > 1 else ""))
        if ax is not axes[0][-1]:
            ax.get_legend().remove()
    sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.suptitle(title)
    return _save(fig, out_dir, name)


def fig_vs_compute(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    frame = table[(table["metric"] == "top1") & table["pretrain_flops"].notna()]
    five = frame["eval"].eq("fewshot") & frame["shots"].eq(5)
    frame = frame[frame["eval"].eq("finetune") | five.fillna(False)]
    if frame.empty:
        return []
    frame = frame.assign(panel=frame["eval"].where(frame["eval"] != "fewshot", "5-shot linear") + " / "
                         + frame["dataset"])
    panels = _panels(frame, ["panel"])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.4, 3.4), squeeze=False)
    palette = _palette(list(frame["model"].unique()))
    for ax, (key, group) in zip(axes[0], panels, strict=True):
        sns.scatterplot(data=group, x="pretrain_flops", y="value", hue="model", style="family",
                        markers=FAMILY_MARKERS, palette=palette, ax=ax, s=50)
        ax.set_xscale("log")
        ax.set_xlabel("pretraining compute (FLOPs)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(key[0])
        if ax is not axes[0][-1]:
            ax.get_legend().remove()
    sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.suptitle("Accuracy vs pretraining compute (Fig 5 analog)")
    return _save(fig, out_dir, "fig5_accuracy_vs_compute")


def plot_all(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Draw every figure the table supports into `out_dir`; returns the written files."""
    _style()
    out_dir.mkdir(parents=True, exist_ok=True)
    return [*fig_vs_data(table, "finetune", out_dir, "fig3_finetune_vs_data",
                         "Fine-tuning accuracy vs pretraining data (Fig 3 analog)"),
            *fig_vs_data(table, "fewshot", out_dir, "fig4_fewshot_vs_data",
                         "Linear few-shot accuracy vs pretraining data (Fig 4 analog)"),
            *fig_vs_compute(table, out_dir)]
