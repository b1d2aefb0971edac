"""Accuracy per setting (mean over tasks), one panel per length, one line per policy and
options; dense as a line. The x axis is the KV bytes the answers held (share of full
precision) when the runner reported them, so that tiers of different sizes compare at
equal bytes, else the budget."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vllm_kvcompress.eval.results import Accuracy
from vllm_kvcompress.eval.settings import DENSE


def series(row: Accuracy) -> str:
    """A setting's policy with its options: its label before the budget or memory."""
    return row.setting.split("@")[0]


def mean_of(rows: Sequence[Accuracy], field: str) -> float:
    """Mean over tasks (each task weighs the same, whatever its n)."""
    return sum(getattr(row, field) for row in rows) / len(rows)


def plot_accuracy(summary: Sequence[Accuracy], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    compressed = [row for row in summary if row.policy != DENSE]
    by_bytes = bool(compressed) and all(row.kv_fraction is not None for row in compressed)
    lengths = sorted({row.target_length for row in summary})
    names = list(dict.fromkeys(series(row) for row in compressed))
    tasks = sorted({row.task for row in summary})
    colors = plt.get_cmap("tab20").colors  # 12+ lines need more than the default 10
    figure, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths) + 2.5, 4),
                                squeeze=False, sharey=True)
    for axis, length in zip(axes[0], lengths):
        for index, name in enumerate(names):
            settings = {}
            for row in compressed:
                if row.target_length == length and series(row) == name:
                    settings.setdefault(row.setting, []).append(row)
            points = sorted((100 * mean_of(rows, "kv_fraction") if by_bytes else rows[0].budget,
                             mean_of(rows, "accuracy")) for rows in settings.values())
            axis.plot(*zip(*points), marker="osv^D<>ph*XP"[index % 12],
                      color=colors[index % len(colors)], label=name)
        dense = [row for row in summary if row.policy == DENSE and row.target_length == length]
        if dense:
            axis.axhline(mean_of(dense, "accuracy"), color="black", linestyle="--", label="dense")
        if by_bytes:
            axis.set_xlabel("KV bytes held (% of full precision)")
        else:
            axis.set_xscale("log", base=2)
            axis.set_xlabel("budget (tokens per KV head per layer)")
        axis.set_title(f"{length} tokens")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"accuracy (mean of {len(tasks)} tasks)")
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
