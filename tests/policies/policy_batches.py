"""Synthetic StreamBatches for the policy tests: ragged, request-major, with every signal."""

from __future__ import annotations

import dataclasses

import torch

from vllm_kvcompress.policies import Selection, StreamBatch

# A learned budget profile for make_batch's 8 layers of 2 KV heads (mean share 1).
PROFILE_SHARES = [[0.5, 1.5], [1.0, 1.0], [2.0, 0.25], [1.75, 0.5], [1.0, 1.0], [0.75, 1.25],
                  [1.0, 0.5], [0.5, 1.5]]

# (policy, kv_policy_args) pairs the property tests run: every policy, main variants.
CASES = [
    ("streaming", {}),
    ("h2o", {}),
    ("h2o", {"allocator": "adakv"}),
    ("snapkv", {}),
    ("snapkv", {"pool": "avg", "pool_kernel": 5, "gqa_reduce": "max"}),
    ("pyramidkv", {}),
    ("adakv", {}),
    ("adakv", {"allocator": "pyramid_adakv"}),
    ("ems", {}),
    ("ems", {"allocator": "uniform", "merge_threshold": 0.5}),
    ("ems", {"global_weight": 1.0, "pool": "none"}),
    ("kvmerger", {}),
    ("kvmerger", {"sigma": 2.0, "allocator": "adakv"}),
    ("d2o", {}),
    ("cam", {}),
    ("elastic", {}),
    ("think", {"recent": 8}),
    ("think", {"base": "kvmerger", "recent": 8}),
    ("mikv", {}),
    ("mikv", {"base": "ems", "key_bits": 2}),
    ("mikv", {"base": "h2o", "lowbit_budget": 5}),
    ("mikv", {"base": "cam", "outlier_balancing": False}),
    ("snapkv", {"allocator": "profile", "head_shares": PROFILE_SHARES}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in options.items() if k != "head_shares")
       for name, options in CASES]


def make_batch(lengths, num_kv_heads=2, group=2, head_dim=16, window=8, seed=0, layer=3,
               num_layers=8, gaps=False, key_bias=0.0, pad_to=None) -> StreamBatch:
    """Streams of `lengths` (request-major, len(lengths) = R * H), random K/V/acc.

    gaps: positions with holes, as after a compression. key_bias: a shared direction
    added to every key (real keys share a large mean component, so cosines are high).
    Window queries: the last `window` token positions of each stream (-1 when shorter).
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.long)
    num_streams = len(lengths)
    max_len = pad_to or int(lengths.max())
    slots = torch.arange(max_len)[None, :]
    live = slots < lengths[:, None]
    steps = torch.randint(1, 4, (num_streams, max_len), generator=gen) if gaps \
        else torch.ones(num_streams, max_len, dtype=torch.long)
    positions = torch.where(live, steps.cumsum(1) - 1, -1)
    keys = torch.randn(num_streams, max_len, head_dim, generator=gen)
    keys = keys + key_bias * torch.randn(head_dim, generator=gen)
    values = torch.randn(num_streams, max_len, head_dim, generator=gen)
    acc = torch.where(live, torch.rand(num_streams, max_len, generator=gen), 0.0)
    queries = torch.randn(num_streams, group, window, head_dim, generator=gen)
    # Query i of the window is the token `window - 1 - i` before the stream's last one.
    back = torch.arange(window - 1, -1, -1)[None, :]
    last_slot = lengths[:, None] - 1 - back
    window_positions = torch.where(last_slot >= 0, positions.gather(1, last_slot.clamp(min=0)), -1)
    densities = torch.rand(num_streams // num_kv_heads, num_layers, generator=gen)
    return StreamBatch(keys=keys, values=values, lengths=lengths, positions=positions,
                       acc_scores=acc, num_kv_heads=num_kv_heads, layer=layer,
                       num_layers=num_layers, scale=head_dim ** -0.5,
                       window_queries=queries, window_positions=window_positions,
                       layer_densities=densities)


def with_garbage_padding(batch: StreamBatch, extra: int = 0, seed: int = 1) -> StreamBatch:
    """The same streams with `extra` more padding slots, and every padding slot (and every
    absent window query) filled with NaN or random positions."""
    gen = torch.Generator().manual_seed(seed)
    n, t, d = batch.keys.shape
    width = t + extra
    live = torch.arange(width)[None, :] < batch.lengths[:, None]

    def pad(x, fill):
        shape = list(x.shape)
        shape[1] = extra
        return torch.cat([x, x.new_full(shape, fill)], dim=1)

    nan = float("nan")
    keys = torch.where(live[..., None], pad(batch.keys, 0.0), nan)
    values = torch.where(live[..., None], pad(batch.values, 0.0), nan)
    acc = torch.where(live, pad(batch.acc_scores, 0.0), nan)
    positions = torch.where(live, pad(batch.positions, 0),
                            torch.randint(0, 10_000, (n, width), generator=gen))
    absent = (batch.window_positions < 0)[:, None, :, None]
    queries = torch.where(absent, nan, batch.window_queries)
    return dataclasses.replace(batch, keys=keys, values=values, acc_scores=acc,
                               positions=positions, window_queries=queries)


def sub_batch(batch: StreamBatch, streams, num_kv_heads: int) -> StreamBatch:
    """Streams `streams` (whole requests when num_kv_heads = batch's), trimmed to their
    own longest length."""
    index = torch.as_tensor(streams, dtype=torch.long)
    width = int(batch.lengths[index].max())
    requests = index[::num_kv_heads] // batch.num_kv_heads
    return dataclasses.replace(
        batch, keys=batch.keys[index, :width], values=batch.values[index, :width],
        lengths=batch.lengths[index], positions=batch.positions[index, :width],
        acc_scores=batch.acc_scores[index, :width], num_kv_heads=num_kv_heads,
        window_queries=batch.window_queries[index], window_positions=batch.window_positions[index],
        layer_densities=batch.layer_densities[requests])


def selection_rows(selection: Selection, streams, width: int) -> dict[str, torch.Tensor]:
    """The fields of `selection` for `streams`, slots beyond `width` cut, as a dict."""
    index = torch.as_tensor(streams, dtype=torch.long)
    rows = {}
    for field in dataclasses.fields(selection):
        value = getattr(selection, field.name)
        if isinstance(value, torch.Tensor):
            value = value[index]
            if field.name not in ("key_scales",):
                value = value[:, :width]
        rows[field.name] = value
    return rows


def assert_same_selection(a: dict, b: dict, live: torch.Tensor) -> None:
    """Two selection_rows dicts agree on live slots (masks exactly, weights closely)."""
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            assert type(x) is type(y) and x == y, name
            continue
        if name in ("key_scales",):
            mask = torch.ones_like(x, dtype=torch.bool)
        else:
            mask = (live if x.dim() == 2 else live[..., None]).expand_as(x)
        if x.dtype.is_floating_point:
            torch.testing.assert_close(x[mask], y[mask], msg=name)
        else:
            assert torch.equal(x[mask], y[mask]), name


def assert_same_streams(a: StreamBatch, b: StreamBatch) -> None:
    """Two batches hold the same live slots (keys, values, positions, acc, lengths)."""
    assert torch.equal(a.lengths, b.lengths)
    live = a.live_mask()
    width = live.shape[1]
    for name in ("keys", "values", "acc_scores"):
        x, y = getattr(a, name)[:, :width], getattr(b, name)[:, :width]
        mask = live if x.dim() == 2 else live[..., None].expand_as(x)
        torch.testing.assert_close(x[mask], y[mask], msg=name)
    assert torch.equal(a.positions[:, :width][live], b.positions[:, :width][live])
