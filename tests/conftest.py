"""Shared fixtures. Tests run on CPU; JAX sees 8 host devices for the multi-device tests."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_bundle():
    from ferry.models.registry import load_model
    return load_model(None, dtype="float32")


@pytest.fixture(scope="session")
def llm(default_bundle):
    """One small engine on the default model, shared by the engine tests (strict compile guard)."""
    from ferry.engine.config import EngineConfig
    from ferry.engine.entrypoints.llm import LLM
    from ferry.engine.llm_engine import LLMEngine
    return LLM.from_engine(LLMEngine(EngineConfig(
        max_batch=8, max_model_len=256, max_prefill_chunk=64, num_pages=96, num_host_pages=64,
        strict_compile_guard=True, warmup_progress=False), bundle=default_bundle))


@pytest.fixture(scope="session")
def hf_model():
    """HF transformers loading the same GGUF (dequantized to float32): the parity reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ferry.models.registry import default_model_path
    path = default_model_path()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
