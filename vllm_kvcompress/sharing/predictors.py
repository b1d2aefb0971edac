"""Where the one bit comes from: the trace's future (perfect), noise on it, or a small
model learned online from the lookups seen so far.

Bits are per request and page, 1 = evict first ("discard": the offline optimum drops the
page before its next use; "phase": the page is not used in the next marking phase).
"""

from __future__ import annotations

import math
import random
import zlib
from collections import deque
from collections.abc import Sequence

from vllm_kvcompress.sharing.cache_sim import belady, check_fits
from vllm_kvcompress.sharing.replacement import chain_bits
from vllm_kvcompress.sharing.traces import TraceRequest, token_chain


HINT_KEY = "kv_cache_hint"            # in SamplingParams.extra_args / vllm_xargs
HINTS = {"discard": 1, "keep": 0}    # or a list of 0/1, one per prompt page


def valid_hint(hint: object) -> bool:
    if isinstance(hint, str):
        return hint in HINTS
    return isinstance(hint, list) and all(bit in (0, 1) and not isinstance(bit, float)
                                          for bit in hint)


def perfect_discard_bits(trace: Sequence[TraceRequest], capacity: int) -> list[list[int]]:
    return belady(trace, capacity)[1]


def exact_hints(prompts: Sequence[list[int]], cache_pages: int,
                page_tokens: int = 32) -> list[list[int]]:
    """Per-page discard bits for a batch whose prompts (token ids) are all known and run in
    this order: Belady's on the batch's own lookups. Pass each as the request's
    `kv_cache_hint` (SamplingParams.extra_args) to an engine with
    --kv-cache-replacement predicted and `cache_pages` pages of `page_tokens` tokens."""
    trace = [TraceRequest(token_chain(prompt, page_tokens)) for prompt in prompts]
    capacity = max(cache_pages, max((len(r.pages) for r in trace), default=0))
    return [chain_bits(bits) for bits in perfect_discard_bits(trace, capacity)]


def phase_starts(trace: Sequence[TraceRequest], capacity: int) -> list[int]:
    """Marking phase of every request: a phase holds at most `capacity` distinct pages."""
    check_fits(trace, capacity)
    phase, seen, out = 0, set(), []
    for request in trace:
        new = set(request.pages) - seen
        if len(seen) + len(new) > capacity:
            phase, seen, new = phase + 1, set(), set(request.pages)
        seen |= new
        out.append(phase)
    return out


def perfect_phase_bits(trace: Sequence[TraceRequest], capacity: int) -> list[list[int]]:
    """1 where the page is not used during the next phase."""
    phases = phase_starts(trace, capacity)
    used: dict[int, set[str]] = {}
    for phase, request in zip(phases, trace):
        used.setdefault(phase, set()).update(request.pages)
    return [[int(page not in used.get(phase + 1, ())) for page in request.pages]
            for phase, request in zip(phases, trace)]


def flip_bits(bits: Sequence[Sequence[int]], rate: float, seed: int = 0) -> list[list[int]]:
    """Each bit inverted with probability `rate` (1.0: every bit wrong)."""
    rng = random.Random(seed)
    return [[bit ^ (rng.random() < rate) for bit in row] for row in bits]


class OnlinePredictor:
    """Logistic regression on hashed features of a page use, trained as it goes.

    Features: depth in the chain, distance to the chain's end, uses of the page so far,
    whether it was a hit, the chain's first page (which system prompt or chat), the uses of
    the request's own branch (a chat's turn number) and their crossings. Labels: every
    `window // 2` requests, Belady replays the last `window` requests on a cache of
    `capacity` pages and labels the older half's uses (their future inside the window is
    known) as discard or keep.
    """

    DIMS = 1 << 14

    def __init__(self, capacity: int, window: int = 128, learning_rate: float = 0.02,
                 threshold: float = 0.6) -> None:
        self.capacity, self.window = capacity, window
        self.learning_rate, self.threshold = learning_rate, threshold
        self.weights = [0.0] * self.DIMS
        self.bias = 0.0
        self.uses: dict[str, int] = {}
        self._recent: deque[tuple[TraceRequest, list[list[int]]]] = deque(maxlen=window)
        self._since_training = 0
        self._pending: list[list[int]] | None = None

    def _features(self, pages: Sequence[str], hits: int) -> list[list[int]]:
        root, n = pages[0] if pages else "", len(pages)
        branch = _branch(pages, self.uses)
        turn = min(self.uses.get(branch, 0), 15)
        rows = []
        for pos, page in enumerate(pages):
            depth, to_end = _bucket(pos), _bucket(n - 1 - pos)
            uses, hit = _bucket(self.uses.get(page, 0)), int(pos < hits)
            names = (f"d{depth}", f"e{to_end}", f"u{uses}", f"h{hit}", f"r{root}",
                     f"r{root}d{depth}", f"e{to_end}u{uses}", f"d{depth}u{uses}",
                     f"d{depth}e{to_end}h{hit}", f"r{root}e{to_end}u{uses}", f"b{branch}",
                     f"b{branch}h{hit}", f"r{root}t{turn}", f"r{root}t{turn}h{hit}")
            rows.append([zlib.crc32(name.encode()) % self.DIMS for name in names])
        return rows

    def _probability(self, row: list[int]) -> float:
        z = self.bias + sum(self.weights[i] for i in row)
        return 1 / (1 + math.exp(-max(min(z, 30.0), -30.0)))

    def predict(self, pages: Sequence[str], hits: int) -> list[int]:
        self._pending = self._features(pages, hits)
        return [int(self._probability(row) > self.threshold) for row in self._pending]

    def observe(self, pages: Sequence[str]) -> None:
        """Record the request just served (after `predict`), train when a window filled."""
        features = self._pending if self._pending is not None else self._features(pages, 0)
        self._pending = None
        self._recent.append((TraceRequest(list(pages)), features))
        for page in pages:
            self.uses[page] = self.uses.get(page, 0) + 1
        self._since_training += 1
        if self._since_training >= self.window // 2 and len(self._recent) == self.window:
            self._train()
            self._since_training = 0

    def _train(self) -> None:
        requests = [request for request, _ in self._recent]
        capacity = max(self.capacity, max(len(r.pages) for r in requests))
        labels = belady(requests, capacity)[1]
        for (_, features), row_labels in list(zip(self._recent, labels))[: self.window // 2]:
            for row, label in zip(features, row_labels):
                error = label - self._probability(row)
                self.bias += self.learning_rate * error * 0.1
                for i in row:
                    self.weights[i] += self.learning_rate * error


def _branch(pages: Sequence[str], uses: dict[str, int]) -> str:
    """The first page used less often than the chain's root: where this request's own
    branch of the prefix tree starts (a chat, a document), identifying it across turns."""
    root_uses = uses.get(pages[0], 0) if pages else 0
    for page in pages:
        if uses.get(page, 0) < root_uses:
            return page
    return pages[-1] if pages else ""


def _bucket(value: int) -> int:
    return value.bit_length()   # 0, 1, 2-3, 4-7, ...
