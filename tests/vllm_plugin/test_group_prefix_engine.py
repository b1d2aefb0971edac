"""A group's prefix kept once by its leader and read by every member, inside a real
in-process vLLM engine: members compute only their own tokens and hold pages only for
them, read the leader's pages exactly (an uncompressed prefix gives stock outputs), and
every page comes back when the group ends, aborts included."""

from __future__ import annotations

import pytest
from engine_driver import all_pages_free, prompt_of_length, run, scheduler, started_llm
from transformers import AutoTokenizer
from vllm import SamplingParams

from vllm_kvcompress import LLM as PlanningLLM

PAGE = 32
ENGINE = dict(block_size=PAGE, max_model_len=1024, enable_prefix_caching=True,
              num_gpu_blocks_override=64, max_num_seqs=4)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def llm(model_dir):
    """One engine for the module (a second one in this process would tear down the
    first one's distributed state): snapkv at 64 tokens, batch scheduling."""
    with started_llm(model_dir, llm_class=PlanningLLM, kv_policy="snapkv", budget=64,
                     kv_scheduling="batch", **ENGINE) as engine:
        yield engine


def group_batch(tokenizer, prefix_pages: int, members: int, leader_args: dict, seed: int):
    """A leader over a prefix of whole pages, then members: prompts and params."""
    prefix = prompt_of_length(tokenizer, prefix_pages * PAGE, seed=seed)
    leader = SamplingParams(max_tokens=1, temperature=0, extra_args={
        "kv_group": "g", "kv_group_prefix": True, **leader_args})
    member = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                            extra_args={"kv_group": "g", "kv_policy": "none"})
    questions = [prompt_of_length(tokenizer, 20 + m, seed=seed + 1 + m) for m in range(members)]
    return [prefix] + [prefix + q for q in questions], [leader] + [member] * members


def member_pages(llm, live: dict[str, int]):
    """after_step callback: the most live pages each running member holds."""
    sched = scheduler(llm)

    def after_step(step: int) -> None:
        for request in sched.running:
            name = request.request_id.split("-")[0]     # vLLM suffixes the ids it is given
            if name != "r0":
                live[name] = max(live.get(name, 0), sched.live_pages(request))
    return after_step


def test_members_read_an_uncompressed_prefix_exactly(llm, tokenizer):
    prompts, params = group_batch(tokenizer, 4, 3, {"kv_policy": "none"}, seed=800)
    sched, kept = scheduler(llm), []
    stats = run(llm, prompts, params,
                after_step=lambda step: kept.append(len(sched.group_prefixes)))
    assert 1 in kept and not sched.group_prefixes
    assert all(stats.cached_tokens[f"r{i}"] == 4 * PAGE for i in (1, 2, 3))
    # The same members alone, no group: vLLM's own prefix caching.
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                           extra_args={"kv_policy": "none"})
    alone = run(llm, prompts[1:], plain)
    assert [stats.outputs[f"r{i}"] for i in (1, 2, 3)] == [alone.outputs[f"r{i}"] for i in range(3)]
    assert all_pages_free(llm)


def test_members_hold_pages_only_for_their_own_tokens_over_a_compressed_prefix(llm, tokenizer):
    # 8 prefix pages compressed by the leader to 64 tokens per head: 2 pages for the group.
    prompts, params = group_batch(tokenizer, 8, 3, {}, seed=900)
    sched, live, kept = scheduler(llm), {}, []

    def after_step(step: int) -> None:
        member_pages(llm, live)(step)
        for prefix in sched.group_prefixes.values():
            kept.append((len(prefix.pages), prefix.tokens, prefix.prefix_len))

    stats = run(llm, prompts, params, after_step=after_step)
    assert set(kept) == {(2, 64, 8 * PAGE)}
    assert all(stats.cached_tokens[f"r{i}"] == 8 * PAGE for i in (1, 2, 3))
    assert all(len(stats.outputs[f"r{i}"]) == 8 for i in (1, 2, 3))
    # 2 shared pages + one of their own (20-22 question tokens + 8 answer tokens).
    assert live == {"r1": 3, "r2": 3, "r3": 3}
    assert not sched.group_prefixes and all_pages_free(llm)


def test_an_aborted_member_or_leader_returns_every_page(llm, tokenizer):
    prompts, params = group_batch(tokenizer, 8, 4, {}, seed=1000)
    sched = scheduler(llm)
    stats = run(llm, prompts, params, abort_after_steps={2: 2})
    assert len(stats.outputs) == 4 and not sched.group_prefixes
    assert all_pages_free(llm)
    # A leader aborted before its prompt is in keeps nothing; its members still run.
    stats = run(llm, prompts, params, abort_after_steps={0: 0})
    assert len(stats.outputs) == 4 and not sched.group_prefixes
    assert all_pages_free(llm)


def test_generate_keeps_each_group_prefix_once_and_returns_outputs_in_input_order(llm, tokenizer):
    documents = [prompt_of_length(tokenizer, 4 * PAGE + 10, seed=1100 + d) for d in range(2)]
    questions = [prompt_of_length(tokenizer, 12, seed=1110 + i) for i in range(6)]
    prompts = [{"prompt_token_ids": documents[i % 2] + q} for i, q in enumerate(questions)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                            extra_args={"kv_policy": "none"})
    sched = scheduler(llm)
    # Rate 1 keeps each 4-page prefix whole: members read exactly what they would compute.
    shared = llm.generate(prompts, params, group_prefix_rate=1)
    given = llm.generate(prompts, params, plan_batch=False)
    assert [o.prompt_token_ids for o in shared] == [p["prompt_token_ids"] for p in prompts]
    assert [o.outputs[0].token_ids for o in shared] == [o.outputs[0].token_ids for o in given]
    assert all(o.num_cached_tokens == 4 * PAGE for o in shared)
    compressed = llm.generate(prompts, params, group_prefix_rate=4)   # 1 page per prefix
    assert [len(o.outputs[0].token_ids) for o in compressed] == [6] * 6
    assert all(o.num_cached_tokens == 4 * PAGE for o in compressed)
    assert not sched.group_prefixes and all_pages_free(llm)
    with pytest.raises(ValueError, match="group_prefix_rate"):
        llm.generate(prompts[0], params, group_prefix_rate=4)
