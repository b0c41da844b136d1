"""A failed step inside the real engine's jitted path: the requests it held end with "error", the
donated KV buffers and slot state are rebuilt, and the engine goes on serving with correct tokens."""
import time

import httpx
import pytest

from ferry.engine.config import EngineConfig
from ferry.engine.llm_engine import LLMEngine
from ferry.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _engine():
    return LLMEngine(EngineConfig(model="random:tiny", max_batch=4, max_model_len=128, max_prefill_chunk=32,
                                  num_pages=40, strict_compile_guard=True, warmup_progress=False,
                                  compile_cache_dir=None, model_cache_dir=None))


def _generate(eng, rid, ids):
    eng.add_request(rid, ids, GREEDY)
    while True:
        for o in eng.step():
            if o.request_id == rid and o.finished:
                return list(o.token_ids)


class _FailAfterDonation:
    """Runs the real decode program (which consumes the donated KV buffers and slot state), then raises."""

    def __init__(self, real):
        self.real, self.consumed = real, []
        self.executables = real.executables                # the runner picks a built program by key

    def __call__(self, key, *args):
        self.consumed = [args[1], args[2]]                   # k, v before the call
        self.real(key, *args)
        raise RuntimeError("injected failure after donation")


@pytest.fixture(scope="module")
def reference():
    return _generate(_engine(), "ref", [5, 6, 7, 8])


def test_failed_step_ends_its_requests_and_the_engine_keeps_serving(reference):
    eng = _engine()
    eng.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    eng.add_request("b", [9, 9], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    eng.step()                                            # prefills
    real = eng.runner.programs["decode"]
    boom = eng.runner.programs["decode"] = _FailAfterDonation(real)
    with pytest.raises(RuntimeError, match="injected failure"):
        eng.step()
    assert all(a.is_deleted() for a in boom.consumed)     # positive control: the buffers really are gone
    assert not eng.kv.k.is_deleted() and not eng.kv.v.is_deleted() and eng.healthy
    eng.runner.programs["decode"] = real
    finals = {o.request_id: o for o in eng.step() if o.finished}
    assert set(finals) == {"a", "b"}
    assert all(o.finish_reason == "error" and "injected failure" in o.error for o in finals.values())
    s = eng.stats()
    assert s["device_pages_used"] == 0 and s["step_failures"] == 1 and not eng.slots.slot_of
    assert _generate(eng, "after", [5, 6, 7, 8]) == reference     # serving again, same tokens
    assert eng.guard.violations == 0


def test_health_is_503_while_recovery_fails_and_200_after(reference):
    from tests.server.conftest import serve
    eng = _engine()
    real_rebuild = eng.kv.rebuild_device
    memory = {"back": False}

    def flaky_rebuild():                                  # fails until the memory "comes back"
        if not memory["back"]:
            raise RuntimeError("cannot allocate (injected)")
        real_rebuild()

    with serve(eng, name="tiny") as (url, aeng):
        assert httpx.get(url + "/health").status_code == 200
        eng.kv.rebuild_device = flaky_rebuild
        real = eng.runner.programs["decode"]
        eng.runner.programs["decode"] = _FailAfterDonation(real)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 5},
                       timeout=60)
        assert r.status_code >= 500 and "error" in r.json()
        assert not eng.healthy
        h = httpx.get(url + "/health")
        assert h.status_code == 503 and h.json()["error"]["code"] == "engine_recovering"
        eng.runner.programs["decode"] = real
        memory["back"] = True
        for _ in range(200):                              # the loop retries the recovery on its next step
            if httpx.get(url + "/health").status_code == 200:
                break
            time.sleep(0.05)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 12,
                                                      "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and eng.healthy
        assert httpx.get(url + "/health").status_code == 200
        assert "ferry_engine_step_errors_total" in httpx.get(url + "/metrics").text
