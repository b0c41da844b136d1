"""vLLM's memory settings as pure helpers of engine/config.py: --swap-space and --gpu-memory-utilization."""
import pytest

from ferry.engine.config import EngineConfig, host_pages_for_swap_space, kv_budget_bytes

GIB = 2**30


def test_swap_space_gib_to_host_pages():
    # SmolLM2-135M f32 page of 16 tokens: 30 layers * 2 (K, V) * 3 KV heads * 16 * 64 * 4 bytes = 737,280
    page = 30 * 2 * 3 * 16 * 64 * 4
    assert host_pages_for_swap_space(4, page) == 4 * GIB // page == 5825
    assert host_pages_for_swap_space(0, page) == 0
    assert host_pages_for_swap_space(0.5, GIB // 4) == 2
    # vLLM's swap space is per GPU: two tensor-parallel devices hold twice the pages
    assert host_pages_for_swap_space(4, page, devices=2) == 2 * 4 * GIB // page
    assert host_pages_for_swap_space(1, GIB + 1) == 0                   # rounds down: never over budget
    for bad in ((-1, page, 1), (1, 0, 1), (1, page, 0)):
        with pytest.raises(ValueError):
            host_pages_for_swap_space(*bad)


def test_gpu_memory_utilization_is_a_budget_for_the_whole_engine():
    limit, weights = 80 * GIB, 16 * GIB
    # Ferry's rule: a fraction of what is free after the weights
    assert kv_budget_bytes(limit, weights, 0.5) == 32 * GIB
    # vLLM's: the engine as a whole stays within u * limit, the KV cache gets that minus the weights
    assert kv_budget_bytes(limit, weights, 0.5, gpu_memory_utilization=0.9) == pytest.approx(0.9 * 80 * GIB - 16 * GIB)
    assert kv_budget_bytes(limit, weights, 0.5, gpu_memory_utilization=1.0) == 64 * GIB
    with pytest.raises(ValueError, match="weights already use 16.00 GiB of the 8.00 GiB"):
        kv_budget_bytes(limit, weights, 0.5, gpu_memory_utilization=0.1)


def test_config_validates_the_new_fields():
    assert EngineConfig(gpu_memory_utilization=0.9, swap_space=0).swap_space == 0
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            EngineConfig(gpu_memory_utilization=bad)
    with pytest.raises(ValueError, match="swap_space"):
        EngineConfig(swap_space=-1)
