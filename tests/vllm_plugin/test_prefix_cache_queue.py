"""PredictedFreeBlockQueue inside vLLM's own BlockPool: the accounting stays vLLM's."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id

from vllm_kvcompress.sharing.replacement import make_replacement
from vllm_kvcompress.vllm_plugin.prefix_cache import PredictedFreeBlockQueue

NUM_BLOCKS = 24


def predicted_pool() -> tuple[BlockPool, PredictedFreeBlockQueue]:
    pool = BlockPool(NUM_BLOCKS, enable_caching=True, hash_block_size=16)
    free = [block for block in pool.blocks if not block.is_null]
    queue = PredictedFreeBlockQueue(free, make_replacement("predicted", len(free)))
    pool.free_block_queue = queue
    return pool, queue


def queue_ids(queue) -> list[int]:
    return [block.block_id for block in queue.get_all_free_blocks()]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000))
def test_random_use_keeps_the_free_queue_exact(seed):
    rng = random.Random(seed)
    pool, queue = predicted_pool()
    held: list[list] = []
    for _ in range(200):
        if held and (rng.random() < 0.45 or pool.get_num_free_blocks() < 4):
            blocks = held.pop(rng.randrange(len(held)))
            for block in blocks:
                queue.bits[block.block_id] = rng.randint(0, 1)
            pool.free_blocks(reversed(blocks))
            # As the scheduler does: a block another holder still reads keeps no bit.
            for block in blocks:
                if block.ref_cnt:
                    queue.bits.pop(block.block_id, None)
        elif rng.random() < 0.3 and pool.cached_block_hash_to_block:
            # A prefix hit: touch a cached block (it leaves the free queue if it was free).
            key = rng.choice(list(pool.cached_block_hash_to_block._cache))
            block = pool.cached_block_hash_to_block.get_one_block(key)
            pool.touch([block])
            held.append([block])
        else:
            blocks = pool.get_new_blocks(rng.randint(1, 3))
            for block in blocks:
                if rng.random() < 0.8:
                    key = make_block_hash_with_group_id(BlockHash(rng.randbytes(8)), 0)
                    pool._insert_block_hash(key, block, num_tokens=None)
            held.append(blocks)
        in_use = {b.block_id for blocks in held for b in blocks}
        free = queue_ids(queue)
        # Exactly the blocks nobody holds are free, each once; counts agree.
        assert len(free) == len(set(free)) == queue.num_free_blocks == pool.get_num_free_blocks()
        assert set(free) == {b.block_id for b in pool.blocks if not b.is_null} - in_use
        assert all(pool.blocks[i].ref_cnt == 0 for i in free)
        # The policy knows exactly the free blocks that are cached.
        cached_free = {i for i in free if pool.blocks[i].block_hash is not None}
        assert queue.policy.num_evictable() == len(cached_free)
        assert not queue.bits       # every bit was used by its release


def test_discard_bits_choose_the_victim():
    pool, queue = predicted_pool()
    blocks = pool.get_new_blocks(NUM_BLOCKS - 1)
    for block in blocks:
        key = make_block_hash_with_group_id(BlockHash(block.block_id.to_bytes(8, "little")), 0)
        pool._insert_block_hash(key, block, num_tokens=None)
    queue.bits[blocks[5].block_id] = 1        # released last, but safe to discard
    pool.free_blocks(blocks[:5] + blocks[6:] + [blocks[5]])
    assert pool.get_new_blocks(1)[0] is blocks[5]
    assert pool.get_new_blocks(1)[0] is blocks[0]     # then least recently released
