"""Run samples through a runner under every setting, scoring each answer as it arrives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from vllm_kvcompress.eval.memory import KVMemory, KVShape
from vllm_kvcompress.eval.samples import Sample
from vllm_kvcompress.eval.scoring import score
from vllm_kvcompress.eval.settings import Setting

# on_answer(sample, setting, output_text, memory): memory is the KV the request held at
# its end (None when the runner cannot see it).
OnAnswer = Callable[[Sample, Setting, str, "KVMemory | None"], None]


class Runner(Protocol):
    """Anything that answers samples under settings (reference, endpoint, offline vLLM).

    It calls on_answer once per pair, in any order.
    """

    def run(self, samples: Sequence[Sample], settings: Sequence[Setting],
            on_answer: OnAnswer) -> None: ...


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
    kv_bytes: int | None = None
    kv_fraction: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def evaluate(runner: Runner, samples: Sequence[Sample], settings: Sequence[Setting],
             on_record: Callable[[Record], None] = lambda record: None,
             shape: KVShape | None = None,
             on_skip: Callable[[Setting, int, str], None] = lambda *skipped: None,
             ) -> list[Record]:
    """All (sample, setting) answers, scored with the sample's metric. Settings given by a
    memory fraction take, per target length, the budget for the shortest prompt of that
    length (`shape`: the model's KV cache, needed then); where no budget fits that memory
    (a low-bit tier alone too large), on_skip(setting, length, reason) is told instead."""
    records: list[Record] = []

    def on_answer(sample: Sample, setting: Setting, output: str,
                  memory: KVMemory | None = None) -> None:
        record = Record(
            task=sample.task, target_length=sample.target_length, num_tokens=sample.num_tokens,
            depth=sample.depth, index=sample.index, setting=setting.label,
            policy=setting.policy, budget=setting.budget, references=list(sample.references),
            output=output, score=score(output, sample.references, sample.metric),
            kv_bytes=None if memory is None else memory.kept_bytes,
            kv_fraction=None if memory is None else memory.fraction,
        )
        records.append(record)
        on_record(record)

    if not any(setting.per_length for setting in settings):
        runner.run(samples, settings, on_answer)
        return records
    if shape is None:
        raise ValueError("settings by memory fraction or quality need the model's KV shape")
    for length in dict.fromkeys(sample.target_length for sample in samples):
        group = [sample for sample in samples if sample.target_length == length]
        shortest = min(sample.num_tokens for sample in group)
        resolved = []
        for setting in settings:
            try:
                resolved.append(setting.at_length(shortest, shape))
            except ValueError as error:
                on_skip(setting, length, str(error))
        runner.run(group, resolved, on_answer)
    return records
