"""Accuracy vs budget per policy (mean over tasks), one panel per length; dense as a line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vllm_kvcompress.eval.results import Accuracy
from vllm_kvcompress.eval.settings import DENSE


def mean_accuracy(summary: Sequence[Accuracy], length: int, policy: str,
                  budget: int | None) -> float:
    """Mean over tasks (each task weighs the same, whatever its n)."""
    rows = [row for row in summary
            if (row.target_length, row.policy, row.budget) == (length, policy, budget)]
    return sum(row.accuracy for row in rows) / len(rows)


def plot_accuracy(summary: Sequence[Accuracy], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    lengths = sorted({row.target_length for row in summary})
    policies = list(dict.fromkeys(row.policy for row in summary if row.policy != DENSE))
    tasks = sorted({row.task for row in summary})
    colors = plt.get_cmap("tab20").colors  # 12+ policies need more than the default 10
    figure, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths) + 1.5, 4),
                                squeeze=False, sharey=True)
    for axis, length in zip(axes[0], lengths):
        for index, policy in enumerate(policies):
            budgets = sorted({row.budget for row in summary
                              if (row.target_length, row.policy) == (length, policy)})
            axis.plot(budgets, [mean_accuracy(summary, length, policy, b) for b in budgets],
                      marker="osv^D<>ph*XP"[index % 12], color=colors[index % len(colors)],
                      label=policy)
        if any(row.policy == DENSE and row.target_length == length for row in summary):
            axis.axhline(mean_accuracy(summary, length, DENSE, None), color="black",
                         linestyle="--", label="dense")
        budgets = sorted({row.budget for row in summary if row.policy != DENSE})
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [str(budget) for budget in budgets])
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
