"""Accuracy per (task, length, setting) from scored records; the table and the JSON file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_kvcompress.eval.harness import Record


@dataclass(frozen=True)
class Accuracy:
    """Mean score of n answers of one task at one target length under one setting, and the
    mean share of full-precision KV bytes they held (None when the runner cannot tell)."""

    task: str
    target_length: int
    setting: str
    policy: str
    budget: int | None
    accuracy: float
    n: int
    kv_fraction: float | None = None


def summarize(records: Sequence[Record]) -> list[Accuracy]:
    """One Accuracy per (task, target_length, setting), in first-seen order."""
    groups: dict[tuple[str, int, str], list[Record]] = {}
    for record in records:
        groups.setdefault((record.task, record.target_length, record.setting), []).append(record)
    return [Accuracy(task=task, target_length=length, setting=setting, policy=group[0].policy,
                     budget=group[0].budget, accuracy=sum(r.score for r in group) / len(group),
                     n=len(group), kv_fraction=_mean([r.kv_fraction for r in group]))
            for (task, length, setting), group in groups.items()]


def format_table(summary: Sequence[Accuracy]) -> str:
    """Markdown: a row per setting, a column per (task, length) with its n, and the mean;
    then the KV bytes held, as a share of full precision, when the runner reported them."""
    columns = list(dict.fromkeys((row.task, row.target_length) for row in summary))
    settings = list(dict.fromkeys(row.setting for row in summary))
    cells = {(row.setting, row.task, row.target_length): row for row in summary}
    with_memory = any(row.kv_fraction is not None for row in summary)
    header = ["setting", *(f"{task} {length} (n={_column_n(summary, task, length)})"
                           for task, length in columns), "mean"]
    header += ["KV bytes"] if with_memory else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting in settings:
        rows = [cells.get((setting, *column)) for column in columns]
        values = [row.accuracy if row is not None else None for row in rows]
        present = [value for value in values if value is not None]
        mean = sum(present) / len(present) if present else None
        cells_text = [setting, *(_percent(v) for v in values), _percent(mean)]
        if with_memory:
            memory = _mean([row.kv_fraction for row in rows if row is not None])
            cells_text.append("-" if memory is None else f"{100 * memory:.1f}%")
        lines.append("| " + " | ".join(cells_text) + " |")
    return "\n".join(lines)


def write_results(path: Path, config: dict[str, Any], records: Sequence[Record]) -> None:
    """JSON with the run's configuration, every scored answer and the summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"config": config, "summary": [asdict(row) for row in summarize(records)],
                "records": [record.to_json() for record in records]}
    path.write_text(json.dumps(document, indent=1))


def _column_n(summary: Sequence[Accuracy], task: str, length: int) -> str:
    counts = sorted({row.n for row in summary if (row.task, row.target_length) == (task, length)})
    return "/".join(str(count) for count in counts)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"
