"""`--kv-scheduling batch` inside a real in-process vLLM engine: admission by peak pages
preempts nothing and keeps outputs; a kv_group's shared prefix stays in memory from its
first member to its last, aborts included, and the pool is whole at the end."""

from __future__ import annotations

import pytest
from engine_driver import all_pages_free, block_pool, prompt_of_length, run, scheduler, started_llm
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.v1.core.kv_cache_utils import get_block_hash

from vllm_kvcompress import LLM as PlanningLLM

PAGE = 32
ENGINE = dict(block_size=PAGE, max_model_len=1024, enable_prefix_caching=True)


def greedy(max_tokens: int, group: str | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                          extra_args={"kv_group": group} if group else None)


def preemption_counter(llm):
    """after_step callback recording each request's preemptions, and the counts."""
    counts: dict[str, int] = {}

    def after_step(step: int) -> None:
        counts.update({rid: r.num_preemptions for rid, r in scheduler(llm).requests.items()})
    return after_step, counts


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("compression", [
    pytest.param({}, id="full"),
    # The compressed peak is CompressionSchedule.peak_pages, checked step by step in
    # tests/cache; this runs it in the engine too.
    pytest.param({"kv_policy": "snapkv", "budget": 64}, id="snapkv", marks=pytest.mark.slow),
])
def test_admission_by_peak_pages_never_preempts_and_keeps_outputs(model_dir, tokenizer,
                                                                  compression):
    # Short prompts, long answers: vLLM admits by the prompt's pages and then preempts as
    # the answers grow; 9 pages (and the null block) hold 3 of these requests at their
    # peak (40 + 56 tokens: 3 pages each) where vLLM admits 4 (2 prompt pages each).
    prompts = [prompt_of_length(tokenizer, 40, seed=300 + i) for i in range(6)]
    outputs, preempted = {}, {}
    for scheduling in ("vllm", "batch"):
        config = {"kv_scheduling": scheduling, **compression}
        with started_llm(model_dir, num_gpu_blocks_override=10, additional_config=config,
                         **{**ENGINE, "max_model_len": 256}) as llm:
            after_step, counts = preemption_counter(llm)
            stats = run(llm, prompts, greedy(56), after_step=after_step)
            outputs[scheduling], preempted[scheduling] = stats.outputs, sum(counts.values())
            assert all_pages_free(llm)
    assert preempted["batch"] == 0
    if not compression:
        assert preempted["vllm"] > 0
    assert outputs["batch"] == outputs["vllm"]


def test_group_prefix_is_held_until_its_last_member_ends(model_dir, tokenizer):
    shared = prompt_of_length(tokenizer, 8 * PAGE, seed=400)
    members = [shared + prompt_of_length(tokenizer, 20, seed=410 + m) for m in range(4)]
    others = [prompt_of_length(tokenizer, 9 * PAGE, seed=420 + i) for i in range(12)]
    # Members at 0, 7, 14, 15 with unrelated requests between them: 12 x 10 pages churn
    # through a 32-page cache, so LRU alone loses the shared prefix between members.
    prompts = [members[0], *others[:6], members[1], *others[6:], members[2], members[3]]
    member_ids = [f"r{i}" for i in (0, 7, 14, 15)]
    params = [greedy(8, "g" if f"r{i}" in member_ids else None) for i in range(len(prompts))]
    runs = {}
    for scheduling in ("vllm", "batch"):
        with started_llm(model_dir, num_gpu_blocks_override=33, max_num_seqs=2,
                         additional_config={"kv_scheduling": scheduling}, **ENGINE) as llm:
            sched, pool = scheduler(llm), block_pool(llm)
            held_ever = set()

            def check_held(step: int) -> None:
                for blocks in getattr(sched, "held", {}).values():
                    for block in blocks.values():   # held: referenced, still cached
                        assert block.ref_cnt > 0 and block.block_hash is not None
                        assert pool.get_cached_block(get_block_hash(block.block_hash),
                                                     [0])[0] is block
                        held_ever.add(block.block_id)

            runs[scheduling] = run(llm, prompts, params, after_step=check_held)
            if scheduling == "batch":
                assert len(held_ever) == 8 and sched.num_held_pages == 0
                assert not sched.members.groups
            assert all_pages_free(llm)
    assert runs["batch"].outputs == runs["vllm"].outputs
    later = member_ids[1:]
    assert all(runs["batch"].cached_tokens[r] == 8 * PAGE for r in later)
    assert runs["vllm"].cached_tokens["r7"] < 8 * PAGE      # what holding is for


def test_a_group_size_keeps_the_prefix_for_members_sent_one_at_a_time(model_dir, tokenizer):
    """A client sends a member, waits for its answer, sends the next: without kv_group_size
    the engine holds nothing (no other member has arrived) and LRU loses the prefix."""
    others = [prompt_of_length(tokenizer, 9 * PAGE, seed=720 + i) for i in range(6)]
    with started_llm(model_dir, num_gpu_blocks_override=33, max_num_seqs=2,
                     additional_config={"kv_scheduling": "batch"}, **ENGINE) as llm:
        sched, hits = scheduler(llm), {}
        for size in (2, None):
            shared = prompt_of_length(tokenizer, 8 * PAGE, seed=700 + (size or 0))
            first, second = (shared + prompt_of_length(tokenizer, 20, seed=710 + m)
                             for m in range(2))
            extra = {"kv_group": f"g{size}"} | ({"kv_group_size": size} if size else {})
            member = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                    extra_args=extra)
            run(llm, [first], member)
            run(llm, others, greedy(8))             # 6 x 10 pages through a 32-page cache
            assert sched.num_held_pages == (8 if size else 0)
            hits[size] = run(llm, [second], member).cached_tokens["r0"]
            assert sched.num_held_pages == 0 and not sched.members.groups
            assert all_pages_free(llm)
    assert hits[2] == 8 * PAGE and hits[None] < 8 * PAGE


def test_aborts_in_the_middle_of_a_group_return_every_page(model_dir, tokenizer):
    shared = prompt_of_length(tokenizer, 12 * PAGE, seed=500)
    prompts = [shared + prompt_of_length(tokenizer, 24, seed=510 + m) for m in range(6)]
    prompts += [prompt_of_length(tokenizer, 10 * PAGE, seed=520 + i) for i in range(4)]
    params = [greedy(24, "g" if i < 6 else "h") for i in range(len(prompts))]
    with started_llm(model_dir, num_gpu_blocks_override=49, max_num_seqs=2,
                     additional_config={"kv_scheduling": "batch"}, **ENGINE) as llm:
        sched = scheduler(llm)
        # One member aborted while running, one while waiting, one of the other group.
        stats = run(llm, prompts, params, abort_after_steps={0: 3, 4: 1, 8: 5})
        assert len(stats.outputs) == len(prompts) - 3
        assert sched.num_held_pages == 0 and not sched.members.groups and not sched.held
        assert all_pages_free(llm)


def test_generate_sends_the_plan_groups_and_keeps_outputs(model_dir, tokenizer):
    systems = [prompt_of_length(tokenizer, 4 * PAGE, seed=600 + s) for s in range(2)]
    prompts = [{"prompt_token_ids": systems[i % 2] + prompt_of_length(tokenizer, 40, seed=610 + i)}
               for i in range(8)]
    with started_llm(model_dir, llm_class=PlanningLLM, kv_scheduling="batch",
                     num_gpu_blocks_override=33, **ENGINE) as llm:
        sched = scheduler(llm)
        groups_seen = []
        original_add = sched.add_request

        def add_request(request):
            groups_seen.append((request.sampling_params.extra_args or {}).get("kv_group"))
            return original_add(request)

        sched.add_request = add_request
        planned = llm.generate(prompts, greedy(6))
        given = llm.generate(prompts, greedy(6), plan_batch=False)
        assert [o.prompt_token_ids for o in planned] == [p["prompt_token_ids"] for p in prompts]
        assert [o.outputs[0].token_ids for o in planned] == [o.outputs[0].token_ids for o in given]
        # Planned: one group per system prompt; as given: none.
        assert len(set(groups_seen[:8])) == 2 and set(groups_seen[8:]) == {None}
        assert sched.num_held_pages == 0 and all_pages_free(llm)
