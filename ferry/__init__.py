"""Ferry: an LLM inference engine on JAX/XLA. The public API::

    from ferry import LLM, SamplingParams

Subpackages (folders at the repository root, installed under this name):
``ferry.engine`` (core; ``entrypoints`` and ``server`` inside it),
``ferry.models``, ``ferry.kernels``, ``ferry.scheduler``.
"""
from ferry.engine.config import Buckets, EngineConfig
from ferry.engine.outputs import RequestOutput, RequestTimings, TokenLogprob
from ferry.engine.sampling_params import SamplingParams


def __getattr__(name):          # heavy imports (JAX, models) only when used
    if name == "LLM":
        from ferry.engine.entrypoints.llm import LLM
        return LLM
    if name == "LLMEngine":
        from ferry.engine.llm_engine import LLMEngine
        return LLMEngine
    if name == "AsyncEngine":
        from ferry.engine.entrypoints.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "AsyncEngine", "SamplingParams", "EngineConfig", "Buckets",
           "RequestOutput", "RequestTimings", "TokenLogprob"]
