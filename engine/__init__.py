"""Ferry engine: Python API, engine loop, model runner, KV cache, server.

    from engine import LLM, SamplingParams
"""
from engine.config import Buckets, EngineConfig
from engine.outputs import RequestOutput, RequestTimings, TokenLogprob
from engine.sampling_params import SamplingParams


def __getattr__(name):          # heavy imports (JAX, models) only when used
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine
        return LLMEngine
    if name == "AsyncEngine":
        from engine.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "AsyncEngine", "SamplingParams", "EngineConfig", "Buckets",
           "RequestOutput", "RequestTimings", "TokenLogprob"]
