"""Traces of prefix-cache lookups: the JSONL format and synthetic workloads.

One request per line: `{"pages": ["<hash>", ...]}`, its prompt's page-hash chain in order
(a page's hash covers every token before it, as vLLM's block hashes do), with optional
`"discard": [0|1, ...]`, a hint per page. `vllm serve --kv-trace FILE` writes real lookups
in this format. The generators build chains from named segments, so two requests share
pages exactly where their prompts share a prefix.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TraceRequest:
    pages: list[str]
    discard: list[int] | None = None    # one hint per page, 1 = safe to evict

    def to_json(self) -> str:
        body = {"pages": self.pages}
        if self.discard is not None:
            body["discard"] = self.discard
        return json.dumps(body)


class TraceError(ValueError):
    pass


def parse_line(line: str, number: int) -> TraceRequest:
    """One trace line; TraceError names the line number and the problem."""
    try:
        body = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"line {number}: not JSON ({exc.msg})") from None
    pages = body.get("pages") if isinstance(body, dict) else None
    if not isinstance(pages, list) or not all(isinstance(p, str) for p in pages):
        raise TraceError(f"line {number}: \"pages\" must be a list of page-hash strings")
    discard = body.get("discard")
    if discard is not None and (not isinstance(discard, list) or len(discard) != len(pages)
                                or any(bit not in (0, 1) for bit in discard)):
        raise TraceError(f"line {number}: \"discard\" must be a list of 0/1, one per page")
    return TraceRequest(pages, discard)


def read_trace(path: str | Path) -> list[TraceRequest]:
    with open(path) as f:
        return [parse_line(line, n) for n, line in enumerate(f, 1) if line.strip()]


def write_trace(path: str | Path, requests: list[TraceRequest]) -> None:
    with open(path, "w") as f:
        for request in requests:
            f.write(request.to_json() + "\n")


def chain(segments: list[str]) -> list[str]:
    """Page hashes of a prompt made of `segments` (one name per page), each covering its
    predecessors."""
    pages, parent = [], ""
    for segment in segments:
        parent = hashlib.sha1(f"{parent}/{segment}".encode()).hexdigest()[:16]
        pages.append(parent)
    return pages


def token_chain(token_ids: list[int], page_tokens: int) -> list[str]:
    """Page hashes of a prompt given as token ids: its full pages only, as vLLM hashes."""
    full = len(token_ids) // page_tokens
    return chain([",".join(map(str, token_ids[i * page_tokens:(i + 1) * page_tokens]))
                  for i in range(full)])


def _pages(name: str, count: int) -> list[str]:
    return [f"{name}.{i}" for i in range(count)]


def _zipf(rng: random.Random, n: int, alpha: float) -> int:
    weights = [1 / (rank + 1) ** alpha for rank in range(n)]
    return rng.choices(range(n), weights)[0]


def system_prompts(requests: int = 3000, prompts: int = 64, prompt_pages: int = 8,
                   user_pages: tuple[int, int] = (1, 4), alpha: float = 1.0,
                   seed: int = 0) -> list[TraceRequest]:
    """Zipf-popular system prompts, each request with its own user text (hinted discard)."""
    rng = random.Random(seed)
    out = []
    for r in range(requests):
        system = _pages(f"sys{_zipf(rng, prompts, alpha)}", prompt_pages)
        user = _pages(f"user{r}", rng.randint(*user_pages))
        out.append(TraceRequest(chain(system + user), [0] * len(system) + [1] * len(user)))
    return out


@dataclass(frozen=True)
class ChatApp:
    """One application behind a system prompt: how long until a user's next turn (in
    requests served meanwhile, exponential) and how many turns a conversation has."""
    mean_gap: float
    turns: tuple[int, int]


CHAT_APPS = (
    ChatApp(mean_gap=4, turns=(3, 10)),     # agent loops: tool results come straight back
    ChatApp(mean_gap=8, turns=(2, 8)),
    ChatApp(mean_gap=60, turns=(1, 6)),     # people reading and typing
    ChatApp(mean_gap=120, turns=(1, 4)),
)


def multi_turn_chat(conversations: int = 400, apps: tuple[ChatApp, ...] = CHAT_APPS,
                    system_pages: int = 4, user_pages: tuple[int, int] = (1, 3),
                    answer_pages: tuple[int, int] = (1, 4), active: int = 24,
                    seed: int = 0) -> list[TraceRequest]:
    """`active` conversations at a time over several apps; turn t's prompt holds every
    earlier turn; a new conversation starts when one ends. The last turn of a
    conversation is hinted discard (but for its shared system prompt)."""
    rng = random.Random(seed)
    started, out = 0, []
    due: list[tuple[float, int, dict]] = []   # (time of the next turn, id, conversation)

    def start(now: float) -> None:
        nonlocal started
        app = rng.randrange(len(apps))
        chat = {"id": started, "app": app, "turns": rng.randint(*apps[app].turns), "done": 0,
                "segments": _pages(f"sys{app}", system_pages)}
        heapq.heappush(due, (now + rng.expovariate(1 / apps[app].mean_gap), started, chat))
        started += 1

    for _ in range(min(active, conversations)):
        start(0.0)
    while due:
        now, _, chat = heapq.heappop(due)
        chat["segments"] += _pages(f"c{chat['id']}u{chat['done']}", rng.randint(*user_pages))
        chat["done"] += 1
        last = chat["done"] == chat["turns"]
        hint = [0] * system_pages + [int(last)] * (len(chat["segments"]) - system_pages)
        out.append(TraceRequest(chain(chat["segments"]), hint))
        chat["segments"] += _pages(f"c{chat['id']}a{chat['done']}", rng.randint(*answer_pages))
        if not last:
            gap = rng.expovariate(1 / apps[chat["app"]].mean_gap)
            heapq.heappush(due, (now + gap, chat["id"], chat))
        elif started < conversations:
            start(now)
    return out


def rag_chunks(requests: int = 3000, passages: int = 30, passage_pages: tuple[int, int] = (4, 8),
               per_prompt: tuple[int, int] = (4, 6), system_pages: int = 4,
               alpha: float = 1.0, seed: int = 0) -> list[TraceRequest]:
    """A system prompt, 4-6 Zipf-popular passages in random order, a question (discard)."""
    rng = random.Random(seed)
    sizes = [rng.randint(*passage_pages) for _ in range(passages)]
    out = []
    for r in range(requests):
        chosen: list[int] = []
        count = rng.randint(*per_prompt)
        while len(chosen) < count:
            p = _zipf(rng, passages, alpha)
            if p not in chosen:
                chosen.append(p)
        segments = _pages("rag-sys", system_pages)
        for p in chosen:
            segments += _pages(f"passage{p}", sizes[p])
        question = _pages(f"q{r}", 1)
        out.append(TraceRequest(chain(segments + question),
                                [0] * len(segments) + [1] * len(question)))
    return out


def batch_tree(systems: int = 2, documents: int = 12, questions: int = 6, system_pages: int = 8,
               document_pages: tuple[int, int] = (16, 32), seed: int = 0) -> list[TraceRequest]:
    """system prompt -> document -> question, shuffled: an offline batch in user order."""
    rng = random.Random(seed)
    out = []
    for s in range(systems):
        for d in range(documents):
            doc = _pages(f"s{s}d{d}", rng.randint(*document_pages))
            for q in range(questions):
                segments = _pages(f"sys{s}", system_pages) + doc + _pages(f"s{s}d{d}q{q}", 1)
                out.append(TraceRequest(chain(segments)))
    rng.shuffle(out)
    return out


GENERATORS = {
    "system-prompts": system_prompts,
    "multi-turn": multi_turn_chat,
    "rag": rag_chunks,
    "batch-tree": batch_tree,
}
