"""PNG plots: training curves of one or several runs on shared axes, and eval tables as grouped bar charts."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _save(fig, out: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(runs: dict[str, list[dict]], keys: list[str], out: str | Path, title: str = "") -> Path:
    """runs: label -> list of metric records (each with "step"); one subplot per key present in any run."""
    keys = [k for k in keys if any(k in r for recs in runs.values() for r in recs)]
    if not keys:
        keys = ["step"]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, recs in runs.items():
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, linewidth=1.4)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers: no 1.5 ticks
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def plot_bars(table: dict[str, dict[str, float]], metrics: list[str], out: str | Path, title: str = "") -> Path:
    """table: model label -> {metric: value in [0, 1]}; grouped bars per metric, values printed in %."""
    labels = list(table)
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(metrics), 3.6))
    for i, label in enumerate(labels):
        vals = [table[label].get(m, float("nan")) for m in metrics]
        xs = [j + i * width for j in range(len(metrics))]
        bars = ax.bar(xs, [0 if math.isnan(v) else 100 * v for v in vals], width, label=label)
        for bar, v in zip(bars, vals):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.5,
                    "n/a" if math.isnan(v) else f"{100 * v:.1f}", ha="center", fontsize=7)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(metrics))], metrics, fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, out)


def last_values(records: list[dict], prefix: str) -> dict[str, float]:
    """The last logged value of every ``prefix``-key in a run's metric records."""
    out: dict[str, float] = {}
    for r in records:
        out.update({k: v for k, v in r.items() if k.startswith(prefix) and isinstance(v, (int, float))})
    return out


def plot_eval_comparison(runs: dict[str, list[dict]], out: str | Path, prefix: str = "eval/",
                         title: str = "") -> Path:
    """runs: label -> metric records (metrics.jsonl); grouped bars of each run's last ``prefix`` metrics that lie
    in [0, 1] (accuracies, pass@k, rates), one group per metric, the runs side by side."""
    table = {label: last_values(recs, prefix) for label, recs in runs.items()}
    metrics = sorted({k for vals in table.values() for k, v in vals.items() if 0.0 <= v <= 1.0})
    if not metrics:
        raise ValueError(f"no {prefix}* metrics in [0, 1] in runs {', '.join(runs)}")
    short = {label: {k.removeprefix(prefix): v for k, v in vals.items()} for label, vals in table.items()}
    return plot_bars(short, [m.removeprefix(prefix) for m in metrics], out, title=title or "eval: last values")
