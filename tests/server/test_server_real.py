"""OpenAI-compatible server: a real uvicorn server on 127.0.0.1 over the real engine (random weights)."""
import asyncio
import json
import threading
import time

import httpx
import pytest

pytest.importorskip("ferry.scheduler.scheduler")      # the real engine needs the scheduler

from ferry.engine.config import EngineConfig  # noqa: E402
from ferry.engine.llm_engine import LLMEngine  # noqa: E402
from tests.server.conftest import serve  # noqa: E402


@pytest.fixture(scope="module")
def server():
    eng = LLMEngine(EngineConfig(model="random:tiny", max_batch=8, max_model_len=256, max_prefill_chunk=64,
                                 num_pages=160, num_host_pages=64, strict_compile_guard=True,
                                 warmup_progress=False, compile_cache_dir=None))
    with serve(eng, max_waiting=400, name="tiny", shutdown_timeout=30.0, idle_poll_s=0.01) as (url, aeng):
        yield url, eng, aeng


def _pages_free(aeng, timeout=10.0):
    t = time.time()
    while time.time() - t < timeout:
        s = aeng.stats()
        if s.get("device_pages_used") == 0 and s.get("host_pages_used") == 0 and s.get("in_flight") == 0:
            return True
        time.sleep(0.05)
    return False


def _sse(text):
    events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    assert events and events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completion_stream_concatenates_to_non_stream(server):
    url, eng, aeng = server
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 20, "temperature": 0.8, "seed": 11,
            "ignore_eos": True}
    full = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert full["object"] == "text_completion" and full["choices"][0]["finish_reason"] == "length"
    assert full["usage"] == {"prompt_tokens": len(eng.tokenizer.encode("hello there")), "completion_tokens": 20,
                             "total_tokens": len(eng.tokenizer.encode("hello there")) + 20}
    r = httpx.post(url + "/v1/completions", json={**body, "stream": True,
                                                  "stream_options": {"include_usage": True}}, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r.text)
    text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    assert text == full["choices"][0]["text"]
    assert chunks[-1]["usage"] == full["usage"]


def test_chat_completion_and_models(server):
    url, eng, aeng = server
    m = httpx.get(url + "/v1/models").json()
    assert m["data"][0]["id"] == "tiny"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 8,
            "temperature": 0, "n": 2, "logprobs": True, "top_logprobs": 3}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert r["choices"][0]["message"]["content"] == r["choices"][1]["message"]["content"]   # greedy
    lp = r["choices"][0]["logprobs"]["content"]
    assert len(lp) == r["usage"]["completion_tokens"] // 2 and len(lp[0]["top_logprobs"]) == 3
    s = httpx.post(url + "/v1/chat/completions", json={**body, "n": 1, "stream": True}, timeout=60)
    chunks = _sse(s.text)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
        r["choices"][0]["message"]["content"]


@pytest.mark.parametrize("path,body,status", [
    ("/v1/completions", "{not json", 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x" * 250, "max_tokens": 100}, 400),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400),
    ("/v1/completions", {"model": "other-model", "prompt": "x"}, 404),
    ("/v1/nothing", {}, 404),
])
def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, path, body, status):
    url, eng, aeng = server
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = httpx.post(url + path, timeout=30, **kw)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in r.text and "type" in err
    ok = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_client_disconnect_aborts_and_frees_pages(server):
    url, eng, aeng = server
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 200,
                                                             "stream": True, "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break                                    # read one chunk, then hang up
    assert _pages_free(aeng), aeng.stats()
    assert aeng.stats()["finished_by_reason"].get("abort", 0) >= 1


def test_metrics_expose_queues_pages_and_latency(server):
    url, eng, aeng = server
    httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "m", "max_tokens": 3}, timeout=30)
    text = httpx.get(url + "/metrics").text
    for name in ('ferry_requests_waiting{model="tiny",queue="0"}', 'queue="5"', "ferry_device_pages_used",
                 "ferry_host_pages_used", "ferry_preemptions_total", "ferry_demotions_total", "ferry_promotions_total",
                 "ferry_time_to_first_token_seconds_bucket", "ferry_inter_token_latency_seconds_bucket",
                 "ferry_request_completion_seconds_count", "ferry_requests_swapped", "ferry_requests_running",
                 "ferry_prompt_tokens_total", "ferry_generation_tokens_total"):
        assert name in text, name
    count = [ln for ln in text.splitlines() if ln.startswith("ferry_request_completion_seconds_count")]
    assert float(count[0].split()[-1]) >= 1


def test_200_concurrent_mixed_requests_complete_without_page_leak(server):
    url, eng, aeng = server

    async def one(client, i):
        body = {"model": "tiny", "prompt": f"req {i}", "max_tokens": 4 + i % 7, "ignore_eos": True,
                "temperature": 0.7, "seed": i}
        if i % 2:
            r = await client.post(url + "/v1/completions", json={**body, "stream": True,
                                                                  "stream_options": {"include_usage": True}})
            return _sse(r.text)[-1]["usage"]["completion_tokens"], 4 + i % 7
        r = await client.post(url + "/v1/completions", json=body)
        return r.json()["usage"]["completion_tokens"], 4 + i % 7

    async def main():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=250)) as client:
            return await asyncio.gather(*[one(client, i) for i in range(200)])

    results = asyncio.run(main())
    assert all(got == want for got, want in results)
    assert _pages_free(aeng), aeng.stats()
    assert eng.guard.violations == 0


def test_full_waiting_room_answers_503_then_shutdown_is_graceful():
    eng = LLMEngine(EngineConfig(model="random:tiny", max_batch=1, max_model_len=256, max_prefill_chunk=64,
                                 num_pages=40, warmup_progress=False, compile_cache_dir=None))
    outs = []
    with serve(eng, max_waiting=1, name="tiny", shutdown_timeout=5.0) as (url, aeng):
        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"model": "tiny", "prompt": "x", "max_tokens": 60, "ignore_eos": True}
                return await asyncio.gather(*[client.post(url + "/v1/completions", json=body) for _ in range(6)])

        rs = asyncio.run(main())
        codes = sorted(r.status_code for r in rs)
        assert 503 in codes and 200 in codes, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert float(busy.headers["retry-after"]) > 0 and busy.json()["error"]["message"]

        # graceful shutdown: the in-flight request ends (finished or aborted), pages all free
        async def inflight():
            from ferry.engine.sampling_params import SamplingParams
            async for o in aeng.generate("y", SamplingParams(max_tokens=200, ignore_eos=True)):
                outs.append(o)

        t = threading.Thread(target=lambda: asyncio.run(inflight()))
        t.start()
        time.sleep(0.5)
    t.join(30)
    assert outs and outs[-1].finished
    assert eng.stats()["device_pages_used"] == 0
