"""Run samples through a runner under every setting, scoring each answer as it arrives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from vllm_kvcompress.eval.samples import Sample
from vllm_kvcompress.eval.scoring import score
from vllm_kvcompress.eval.settings import Setting


class Runner(Protocol):
    """Anything that answers samples under settings (reference, endpoint, offline vLLM).

    It calls on_answer(sample, setting, output_text) once per pair, in any order.
    """

    def run(self, samples: Sequence[Sample], settings: Sequence[Setting],
            on_answer: Callable[[Sample, Setting, str], None]) -> None: ...


@dataclass
class Record:
    """One scored answer."""

    task: str
    target_length: int
    num_tokens: int
    depth: float
    index: int
    setting: str
    policy: str
    budget: int | None
    references: list[str]
    output: str
    score: float

    def to_json(self) -> dict:
        return asdict(self)


def evaluate(runner: Runner, samples: Sequence[Sample], settings: Sequence[Setting],
             on_record: Callable[[Record], None] = lambda record: None) -> list[Record]:
    """All (sample, setting) answers, scored with the sample's metric."""
    records: list[Record] = []

    def on_answer(sample: Sample, setting: Setting, output: str) -> None:
        record = Record(
            task=sample.task, target_length=sample.target_length, num_tokens=sample.num_tokens,
            depth=sample.depth, index=sample.index, setting=setting.label,
            policy=setting.policy, budget=setting.budget, references=list(sample.references),
            output=output, score=score(output, sample.references, sample.metric),
        )
        records.append(record)
        on_record(record)

    runner.run(samples, settings, on_answer)
    return records
