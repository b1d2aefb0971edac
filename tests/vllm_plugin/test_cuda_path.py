"""The CUDA path's pieces that run without a GPU: the backend vLLM's selector and
allocator see, the LBHNC page views, the start-up checks and the memory reserve."""

from __future__ import annotations

import os

import pytest
import torch
from vllm.config.compilation import CUDAGraphMode
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.kv_cache_interface import (
    KVCacheLayout,
    KVCacheTensor,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.worker.gpu_worker import Worker

from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError
from vllm_kvcompress.vllm_plugin import register
from vllm_kvcompress.vllm_plugin.backend import (
    CompressedAttentionImpl,
    CompressedAttentionMetadataBuilder,
)
from vllm_kvcompress.cache.pools import head_block_pools
from vllm_kvcompress.vllm_plugin.engine_setup import (
    GPU_WORKER,
    enable_compression,
    prepare_engine_args,
)
from vllm_kvcompress.vllm_plugin.gpu_backend import CompressedCUDAAttentionBackend
from vllm_kvcompress.vllm_plugin.gpu_worker import GPUCompressionWorker
from vllm_kvcompress.vllm_plugin.kv_cache_spec import CompressedAttentionSpec
from vllm_kvcompress.vllm_plugin.memory_reserve import kv_cache_bytes, owned_bytes, runtime_bytes
from vllm_kvcompress.vllm_plugin.runtime import (
    COMPRESSION_WORKSPACE_BYTES,
    CompressionGroup,
    stream_buffers,
    workspace_passes,
)
from vllm_kvcompress.vllm_plugin.worker import CompressionWorker

register()


def _validate(**overrides) -> list[str]:
    settings = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=32,
                    use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                    use_per_head_quant_scales=False, device_capability=None,
                    attn_type="decoder")
    settings.update(overrides)
    backend = CompressedCUDAAttentionBackend
    # The base class checks the compute capability through the platform: any will do.
    return [reason for reason in backend.validate_configuration(**settings)
            if "compute capability" not in reason]


def test_the_cuda_backend_is_what_vllm_selects_and_allocates_for():
    backend = CompressedCUDAAttentionBackend
    assert backend.get_name() == "CUSTOM"
    assert backend.get_impl_cls() is CompressedAttentionImpl
    assert backend.get_builder_cls() is CompressedAttentionMetadataBuilder
    assert backend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
    assert backend.forward_includes_kv_cache_update
    # NEVER: vLLM falls back to piecewise graphs around eager attention.
    assert CompressedAttentionMetadataBuilder.get_cudagraph_support(None, None) \
        == AttentionCGSupport.NEVER
    assert _validate() == []
    assert _validate(head_size=80, dtype=torch.float16) == []
    assert _validate(kv_cache_dtype="fp8") == ["kv_cache_dtype not supported"]
    assert _validate(block_size=16) == ["block_size not supported"]
    assert _validate(attn_type="encoder_only") == ["attention type encoder_only not supported"]


def test_the_gpu_worker_shares_the_cpu_workers_hooks():
    assert issubclass(GPUCompressionWorker, CompressionWorker)
    assert issubclass(GPUCompressionWorker, Worker)
    mro = GPUCompressionWorker.__mro__
    # The hooks run first, then vLLM's worker.
    assert mro.index(CompressionWorker) < mro.index(Worker)
    assert GPUCompressionWorker.backend_slot is AttentionBackendEnum.CUSTOM
    assert GPUCompressionWorker.backend_cls.endswith("CompressedCUDAAttentionBackend")


def _layer_views(layout: KVCacheLayout, num_blocks=6, num_layers=3, heads=2, head_size=64):
    spec = CompressedAttentionSpec(block_size=32, num_kv_heads=heads, head_size=head_size,
                                   dtype=torch.bfloat16)
    strides = compute_layout_strides(spec, num_blocks, num_layers, layout)
    size = num_layers * num_blocks * spec.page_size_bytes
    tensor = KVCacheTensor(size=size, layers=[f"layer.{i}" for i in range(num_layers)],
                           layer_stride=strides[0], block_stride=strides[1])
    raw = torch.zeros(size, dtype=torch.int8)
    return create_kv_cache_views(raw, spec, num_blocks, layout, tensor), raw


def test_lbhnc_pages_are_head_block_pools_in_bf16():
    views, raw = _layer_views(KVCacheLayout.LBHNC)
    heads, head_size = 2, 64
    for layer, view in enumerate(views):
        assert view.shape == (6, heads, 32, 2 * head_size) and view.dtype == torch.bfloat16
        assert view.stride(0) == heads * view.stride(1)  # block b, head h: cell b * H + h
        keys, values = head_block_pools(view, 32, head_size, keys_transposed=False)
        assert keys.shape == values.shape == (6 * heads, 32, head_size)
        marker = torch.randn(32, head_size).to(torch.bfloat16)
        keys[4 * heads + 1] = marker
        values[3 * heads] = -marker
        # A (page, head) cell is the plugin's: block_size keys, then block_size values.
        assert torch.equal(view[4, 1].reshape(2, 32, head_size)[0], marker)
        assert torch.equal(view[3, 0].reshape(2, 32, head_size)[1], -marker)
    # Each layer's pages are its own bytes: writing every layer touched all of them once.
    assert raw.view(torch.bfloat16).ne(0).sum() == 3 * 2 * 32 * head_size


def test_token_major_pages_cannot_be_head_block_pools():
    view = _layer_views(KVCacheLayout.LBNHC)[0][0]
    # FlashAttention's layout interleaves the heads token by token inside a page.
    assert not view[0, 0].is_contiguous()
    with pytest.raises(RuntimeError):
        head_block_pools(view, 32, 64, keys_transposed=False)


def _config(model_dir, **engine_args):
    return EngineArgs(model=str(model_dir), **engine_args).create_engine_config()


def _as_cuda_config(vllm_config, graphs=CUDAGraphMode.FULL_AND_PIECEWISE):
    """The config vLLM's CUDA platform would hand the plugin: its worker and graphs."""
    vllm_config.parallel_config.worker_cls = GPU_WORKER
    vllm_config.compilation_config.cudagraph_mode = graphs
    return vllm_config


def test_a_cuda_config_takes_the_gpu_worker_and_custom_backend(model_dir):
    vllm_config = _as_cuda_config(_config(model_dir), CUDAGraphMode.PIECEWISE)
    enable_compression(vllm_config, KVCompressConfig(kv_policy="snapkv"))
    assert vllm_config.parallel_config.worker_cls.endswith("GPUCompressionWorker")
    assert vllm_config.attention_config.backend is AttentionBackendEnum.CUSTOM
    assert vllm_config.cache_config.block_size == 32


@pytest.mark.parametrize("change, expected", [
    (lambda c: setattr(c.compilation_config, "cudagraph_mode", CUDAGraphMode.FULL),
     "cudagraph_mode=FULL (use PIECEWISE or NONE)"),
    (lambda c: setattr(c.attention_config, "backend", AttentionBackendEnum.FLASH_ATTN),
     "--attention-backend FLASH_ATTN"),
    (lambda c: setattr(c.cache_config, "cache_dtype", "fp8"), "--kv-cache-dtype fp8"),
])
def test_a_cuda_start_refuses_what_it_cannot_run(model_dir, change, expected):
    vllm_config = _as_cuda_config(_config(model_dir), CUDAGraphMode.PIECEWISE)
    change(vllm_config)
    with pytest.raises(KVCompressConfigError, match="KV compression cannot run with") as info:
        enable_compression(vllm_config, KVCompressConfig(kv_policy="snapkv"))
    assert expected in str(info.value)


def test_engine_args_ask_for_the_v1_runner_and_refuse_v2_or_full_graphs(monkeypatch, model_dir):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    engine_args = EngineArgs(model=str(model_dir))
    prepare_engine_args(engine_args)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(KVCompressConfigError, match="VLLM_USE_V2_MODEL_RUNNER=1"):
        prepare_engine_args(EngineArgs(model=str(model_dir)))
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    for mode in ("full", "FULL_AND_PIECEWISE", "full_decode_only"):
        engine_args = EngineArgs(model=str(model_dir), compilation_config={"cudagraph_mode": mode})
        with pytest.raises(KVCompressConfigError, match="use PIECEWISE or NONE"):
            prepare_engine_args(engine_args)
    prepare_engine_args(EngineArgs(model=str(model_dir),
                                   compilation_config={"cudagraph_mode": "piecewise"}))


def test_the_memory_reserve_is_what_the_runtime_allocates(model_dir):
    vllm_config = _config(model_dir, max_num_seqs=8, max_model_len=2048,
                          additional_config={"kv_policy": "snapkv"})
    model = vllm_config.model_config
    layers, heads = model.get_num_layers(vllm_config.parallel_config), model.get_num_kv_heads(
        vllm_config.parallel_config)
    head_size, dtype = model.get_head_size(), model.dtype
    for pages in (3, 40):
        kv = [torch.zeros(pages, heads, 32, 2 * head_size, dtype=dtype) for _ in range(layers)]
        real = owned_bytes(stream_buffers(vllm_config, kv, heads, head_size, 32, True), kv)
        assert runtime_bytes(vllm_config, pages) == real + COMPRESSION_WORKSPACE_BYTES
    available = 3 << 30
    kept = kv_cache_bytes(vllm_config, available)
    page = layers * heads * 32 * 2 * head_size * dtype.itemsize
    pages = kept // page
    assert kept % page == 0 and pages > 0
    assert kept + runtime_bytes(vllm_config, pages) <= available
    assert kept + page + runtime_bytes(vllm_config, pages + 1) > available  # nothing idle


def test_large_compression_groups_run_in_passes_that_fit_the_workspace():
    group = CompressionGroup(policy=None, budget=64, slots=[5, 1, 7, 2, 9],
                             tokens=[100, 300, 50, 1000, 10])
    passes = workspace_passes(group, bytes_per_token=10, limit=6000)
    assert [p.slots for p in passes] == [[5, 1], [7], [2], [9]]
    assert [p.tokens for p in passes] == [[100, 300], [50], [1000], [10]]
    for part in passes:  # padded to the longest member; one member may exceed alone
        assert len(part.slots) == 1 or len(part.slots) * max(part.tokens) * 10 <= 6000
    assert [p.slots for p in workspace_passes(group, 1, 10**9)] == [group.slots]
