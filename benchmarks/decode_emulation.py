"""Decode steps of a Llama-3-8B-shaped model over compressed per-head streams, in plain torch
with this project's kernels: tokens/s at compression ratio r against r = 1, same KV memory.

Each CR r keeps context / r tokens per stream (ragged over heads around that mean) and
fits as many requests into --kv-gib as their streams need (up to --max-batch). A step runs
every layer: the QKV projection, write of the new K/V, paged attention over the per-head
tables (with H2O's score emission when r > 1), the output projection and the gated MLP
(one layer's weights, read by every layer: the same memory traffic as 32 distinct ones).
With r > 1 a 1/--interval share of the requests compresses each step (gather, H2O's
selection, compaction), as the runtime's interval schedule spreads them. Norms, RoPE and
sampling are left out: they cost the same at every r. Host syncs of one step are counted
(cache/host_syncs.py). This is what vLLM's decode would do with the plugin's CUDA path,
short of vLLM itself (which cannot run on the GPU machine; see the README).

    python benchmarks/decode_emulation.py --device cuda --json decode.json
    python benchmarks/decode_emulation.py --layers 2 --hidden 256 --heads 4 --kv-heads 2 \\
        --head-dim 32 --ffn 512 --context 256 --kv-gib 0.01 --crs 1 4   # a CPU smoke run
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from timing import machine, median_ms, parse, print_table
from vllm_kvcompress.cache import PagedStreamCache
from vllm_kvcompress.cache.host_syncs import HostSyncCounter
from vllm_kvcompress.policies import StreamBatch
from vllm_kvcompress.policies.registry import make_policy
from vllm_kvcompress.policies.selection import Selection

BLOCK_SIZE = 32
# --smoke: shapes small enough for Triton's interpreter.
SMOKE = dict(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=32, ffn=512, context=256,
             kv_gib=0.003, crs=[1, 4], steps=2)


def options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--context", type=int, default=8192, help="tokens seen per request")
    parser.add_argument("--kv-gib", type=float, default=40.0, help="KV memory at every CR")
    parser.add_argument("--crs", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--interval", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per CR")
    return parser


class Model:
    """One decoder layer's weights, used for every layer."""

    def __init__(self, args, dtype, device):
        q, kv = args.heads * args.head_dim, args.kv_heads * args.head_dim

        def weight(rows, cols):
            return torch.randn(rows, cols, dtype=dtype, device=device) * rows ** -0.5

        self.qkv, self.out = weight(args.hidden, q + 2 * kv), weight(q, args.hidden)
        self.gate_up, self.down = weight(args.hidden, 2 * args.ffn), weight(args.ffn, args.hidden)
        self.split = (q, kv, kv)


def filled_cache(args, batch: int, kept: int, room: int, dtype,
                 device) -> PagedStreamCache:
    """`batch` requests whose streams hold `kept` tokens in every layer (ragged over heads
    around that mean when compressed), with pages for `room` more tokens each."""
    gen = torch.Generator().manual_seed(0)
    spread = 0.5 if kept < args.context else 0.0
    lengths = (kept * (1 - spread + 2 * spread * torch.rand(batch, args.kv_heads,
                                                            generator=gen))).long()
    lengths = (lengths * kept * args.kv_heads / lengths.sum(1, keepdim=True)).long().clamp(1)
    longest = lengths.max(1).values
    pages = -(-(int(longest.max()) + room) // BLOCK_SIZE) + 1
    cache = PagedStreamCache(args.layers, args.kv_heads, args.head_dim, batch * pages, batch,
                             pages, block_size=BLOCK_SIZE, dtype=dtype, device=device)
    slots = list(range(batch))
    for r in slots:
        cache.add_pages(r, range(r * pages, (r + 1) * pages))
    cache.append(slots, longest.tolist())
    keep = torch.arange(int(longest.max()))[None, :] < lengths.view(-1, 1)
    for layer in range(args.layers):
        cache.layers[layer].keys.normal_()
        cache.layers[layer].values.normal_()
        cache.compact(layer, slots, Selection(keep=keep.to(device)))
    return cache


def step(args, model: Model, cache: PagedStreamCache, x: torch.Tensor, due: list[int],
         budget: int | None, policy, scale: float) -> torch.Tensor:
    """One decode step of every request; the `due` requests compress to `budget`."""
    batch = x.shape[0]
    slots = list(range(batch))
    slot_ids = cache.append(slots, [1] * batch)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=x.device)
    positions = torch.full((batch,), args.context, device=x.device)
    for layer in range(args.layers):
        q, k, v = (x @ model.qkv).split(model.split, dim=1)
        cache.write(layer, slot_ids[layer], k.view(batch, args.kv_heads, -1),
                    v.view(batch, args.kv_heads, -1), positions)
        attended = cache.attention(layer, q.view(batch, args.heads, -1), qsl, slots, scale,
                                   emit_scores=budget is not None, max_query_len=1)
        x = x + attended.view(batch, -1) @ model.out
        gate, up = (x @ model.gate_up).chunk(2, dim=1)
        x = x + (F.silu(gate) * up) @ model.down
        if due:
            view = cache.gather(layer, due)
            streams = StreamBatch(
                keys=view.keys, values=view.values, lengths=view.lengths,
                positions=view.positions, acc_scores=view.scores, num_kv_heads=args.kv_heads,
                layer=layer, num_layers=args.layers, scale=scale)
            cache.compact(layer, due, policy.compress(streams, budget))
    return x


def run(args, device, dtype) -> None:
    bytes_per_token = args.layers * args.kv_heads * 2 * args.head_dim * dtype.itemsize
    policy, scale = make_policy("h2o"), args.head_dim ** -0.5
    model = Model(args, dtype, device)
    rows, base = [], None
    for cr in args.crs:
        kept = args.context // cr
        room = args.interval + args.steps + 2  # tokens a stream gains while timed
        longest = kept * 3 // 2 if cr > 1 else kept  # heads' spread when compressed
        per_request = (longest + room + 2 * BLOCK_SIZE) * bytes_per_token
        batch = min(args.max_batch, int(args.kv_gib * 2**30 // per_request))
        if batch == 0:
            print(f"CR {cr}: not one request fits {args.kv_gib} GiB")
            continue
        cache = filled_cache(args, batch, kept, room, dtype, device)
        x = torch.randn(batch, args.hidden, dtype=dtype, device=device)
        budget = None if cr == 1 else kept
        turn = [0]

        def one_step():
            # Each step the next 1/interval of the requests compresses (none at CR 1).
            due = [] if budget is None else [
                r for r in range(batch) if r % args.interval == turn[0] % args.interval]
            turn[0] += 1
            step(args, model, cache, x, due, budget, policy, scale)

        ms = median_ms(one_step, device, repeats=args.steps, warmup=1)
        with HostSyncCounter() as syncs:
            one_step()
        tokens_per_s = batch / ms * 1e3
        base = base or tokens_per_s
        rows.append([cr, kept, batch, ms, tokens_per_s, tokens_per_s / base, syncs.total])
        del cache
    print(f"{machine(device)}, dtype {dtype}, {args.layers} layers, {args.heads} query / "
          f"{args.kv_heads} KV heads x {args.head_dim}, context {args.context}, KV "
          f"{args.kv_gib} GiB, H2O with interval {args.interval}")
    print_table(["CR", "kept tokens", "batch", "step ms", "tokens/s", "vs CR 1",
                 "host syncs per step"], rows)


def main() -> None:
    device, dtype, args = parse(options())
    if args.smoke:
        vars(args).update(SMOKE)
    with torch.inference_mode():
        run(args, device, dtype)


if __name__ == "__main__":
    main()
