"""Server logic over the deterministic FakeEngine: a real uvicorn server on 127.0.0.1, httpx and openai clients."""
import asyncio
import json
import re
import threading
import time

import httpx
import pytest
from tests.entrypoints.fake_engine import FakeEngine
from tests.server.conftest import serve


@pytest.fixture(scope="module")
def server():
    eng = FakeEngine(max_model_len=128, max_batch=8, num_pages=256)
    with serve(eng) as (url, aeng):
        yield url, eng, aeng


def _sse(r):
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    blocks = r.text.split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1])
    events = [b[6:] for b in blocks[:-1]]
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def _idle(aeng, eng, timeout=10.0):
    t = time.time()
    while time.time() - t < timeout:
        if aeng.stats()["in_flight"] == 0 and eng.stats()["device_pages_used"] == 0:
            return True
        time.sleep(0.02)
    return False


def test_completion_stream_equals_non_stream_and_usage(server):
    url, eng, aeng = server
    body = {"model": "fake", "prompt": "hello", "max_tokens": 9, "seed": 5, "ignore_eos": True, "user": "u1"}
    full = httpx.post(url + "/v1/completions", json=body).json()
    assert full["object"] == "text_completion" and full["model"] == "fake" and full["id"].startswith("cmpl-")
    choice = full["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["text"]) == 9 and choice["logprobs"] is None
    assert full["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    chunks = _sse(httpx.post(url + "/v1/completions", json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}}))
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == full["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    plain = _sse(httpx.post(url + "/v1/completions", json={**body, "stream": True}))
    assert all("usage" not in c for c in plain)


def test_prompt_forms_n_and_echo(server):
    url, eng, aeng = server
    ids = eng.tokenizer.encode("abc")
    base = {"model": "fake", "max_tokens": 4, "seed": 1, "ignore_eos": True}
    by_text = httpx.post(url + "/v1/completions", json={**base, "prompt": "abc"}).json()
    by_ids = httpx.post(url + "/v1/completions", json={**base, "prompt": ids}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    many = httpx.post(url + "/v1/completions", json={**base, "prompt": ["abc", "de"], "n": 2}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["choices"][0]["text"] == by_text["choices"][0]["text"]       # sample k uses seed + k
    assert many["choices"][0]["text"] != many["choices"][1]["text"]
    assert many["usage"] == {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}
    lists = httpx.post(url + "/v1/completions", json={**base, "prompt": [ids, ids[:2]]}).json()
    assert len(lists["choices"]) == 2 and lists["usage"]["prompt_tokens"] == 5
    echo = httpx.post(url + "/v1/completions", json={**base, "prompt": "abc", "echo": True}).json()
    assert echo["choices"][0]["text"] == "abc" + by_text["choices"][0]["text"]


def test_stop_strings_eos_and_penalty_fields(server):
    url, eng, aeng = server
    base = {"model": "fake", "prompt": "stop test", "max_tokens": 40, "seed": 2, "ignore_eos": True}
    text = httpx.post(url + "/v1/completions", json=base).json()["choices"][0]["text"]
    stop = text[5]
    r = httpx.post(url + "/v1/completions", json={**base, "stop": [stop, "zzzz"], "presence_penalty": 0.5,
                                                   "frequency_penalty": -0.5, "repetition_penalty": 1.1,
                                                   "top_k": 5, "min_p": 0.05, "top_p": 0.9,
                                                   "temperature": 0.7, "priority": 1}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == text[:text.index(stop)]
    eos = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "eos please", "max_tokens": 20}).json()
    assert eos["choices"][0]["finish_reason"] == "stop" and len(eos["choices"][0]["text"]) == 3


def test_logprobs_shapes(server):
    url, eng, aeng = server
    r = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "lp", "max_tokens": 5,
                                                   "logprobs": 2, "ignore_eos": True}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 5
    assert "".join(lp["tokens"]) == r["choices"][0]["text"] and lp["text_offset"] == [0, 1, 2, 3, 4]
    assert all(len(t) <= 2 for t in lp["top_logprobs"])
    c = httpx.post(url + "/v1/chat/completions", json={
        "model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True,
        "top_logprobs": 3, "ignore_eos": True}).json()
    content = c["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(e["top_logprobs"]) == 3 for e in content)
    assert all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} for e in content)
    s = _sse(httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "lp", "max_tokens": 5,
                                                        "logprobs": 1, "stream": True, "ignore_eos": True}))
    assert sum(len(ch["choices"][0]["logprobs"]["tokens"]) for ch in s if ch["choices"][0]["logprobs"]) == 5


def test_chat_stream_matches_non_stream(server):
    url, eng, aeng = server
    body = {"model": "fake", "messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 6, "max_tokens": 50, "seed": 9, "ignore_eos": True, "n": 2}
    full = httpx.post(url + "/v1/chat/completions", json=body).json()
    assert full["object"] == "chat.completion" and len(full["choices"]) == 2
    prompt_len = len(eng.tokenizer.encode(eng.tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])))
    assert full["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 12, "total_tokens": prompt_len + 12}
    chunks = _sse(httpx.post(url + "/v1/chat/completions", json={**body, "stream": True,
                                                                 "stream_options": {"include_usage": True}}))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["delta"] == {}
        assert "".join(m["delta"].get("content", "") for m in mine) == full["choices"][i]["message"]["content"]
    assert chunks[-1]["usage"] == full["usage"]
    # no max_tokens: generation may fill the context
    r = httpx.post(url + "/v1/chat/completions", json={"model": "fake", "ignore_eos": True,
                                                        "messages": [{"role": "user", "content": "x"}]}).json()
    assert r["usage"]["total_tokens"] == eng.max_model_len


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    url, eng, aeng = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == ["fake"]
    comp = client.completions.create(model="fake", prompt="hey", max_tokens=5, seed=4)
    parts = [c.choices[0].text for c in client.completions.create(model="fake", prompt="hey", max_tokens=5,
                                                                   seed=4, stream=True) if c.choices]
    assert "".join(parts) == comp.choices[0].text and comp.usage.completion_tokens == 5
    chat = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "yo"}],
                                          max_completion_tokens=4, seed=8, extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "yo"}],
                                            max_completion_tokens=4, seed=8, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 4
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="fake", prompt="x", max_tokens=1, temperature=-3)


BAD = [
    ("/v1/completions", "{not json", 400),
    ("/v1/completions", "[1, 2]", 400),
    ("/v1/completions", {"model": "fake"}, 400),                                   # no prompt
    ("/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": "many"}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 1.5}, 400),
    ("/v1/completions", {"model": "fake", "prompt": {"a": 1}}, 400),
    ("/v1/completions", {"model": "fake", "prompt": ["a", 1]}, 400),
    ("/v1/completions", {"model": "fake", "prompt": []}, 400),
    ("/v1/completions", {"model": "fake", "prompt": ""}, 400),
    ("/v1/completions", {"model": "fake", "prompt": [1, 99999]}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": True}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": "5"}, 400),
    ("/v1/completions", {"model": "fake", "prompt": [True, False]}, 400),
    ("/v1/completions", '{"model": "fake", "prompt": "x", "temperature": NaN}', 400),
    ("/v1/completions", '{"model": "fake", "prompt": "x", "top_p": Infinity}', 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "logprobs": True}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "temperature": "hot"}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "top_p": 1.5}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "top_p": 0}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "min_p": 2}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": -5}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "n": 0}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "n": 1000}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "presence_penalty": 3}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "frequency_penalty": -2.5}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "repetition_penalty": 0}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "logprobs": 21}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "seed": 2 ** 70}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "stop": [""]}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "stop": 5}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "stream": "yes please"}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x" * 100, "max_tokens": 50}, 400),    # beyond context
    ("/v1/completions", {"model": "fake", "prompt": "x", "length_hint": 0}, 400),
    ("/v1/completions", {"model": "fake", "prompt": "x", "length_hint": 2.5}, 400),
    ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x"}],
                              "length_hint": -3}, 400),
    ("/v1/chat/completions", {"model": "fake", "messages": "hi"}, 400),
    ("/v1/chat/completions", {"model": "fake", "messages": []}, 400),
    ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400),                            # top_logprobs needs logprobs
    ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x" * 200}]}, 400),
    ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 500}, 400),
    ("/v1/completions", {"model": "other-model", "prompt": "x"}, 404),
    ("/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("/v1/nothing", {}, 404),
    ("/v2/completions", {"model": "fake", "prompt": "x"}, 404),
]


@pytest.mark.parametrize("path,body,status", BAD, ids=[f"{i}-{s}" for i, (_, _, s) in enumerate(BAD)])
def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, path, body, status):
    url, eng, aeng = server
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = httpx.post(url + path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    ok = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "ok", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert _idle(aeng, eng)


def test_wrong_method_and_get_routes(server):
    url, eng, aeng = server
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/nope").status_code == 404


def test_engine_step_error_gives_500_then_server_recovers(server):
    url, eng, aeng = server
    body = {"model": "fake", "prompt": "fail", "max_tokens": 5}
    eng.fail_steps = 1
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error" and "Traceback" not in r.text
    assert _idle(aeng, eng)
    for _ in range(500):              # the loop flushes the abort output of the failed request
        if not eng._pending_final and not eng._requests:
            break
        time.sleep(0.01)
    eng.fail_steps = 1
    chunks = _sse(httpx.post(url + "/v1/completions", json={**body, "stream": True}))
    assert chunks[-1]["error"]["code"] == "engine_error"
    assert httpx.post(url + "/v1/completions", json=body).status_code == 200
    assert _idle(aeng, eng)


def test_client_disconnect_aborts_stream_and_non_stream(server):
    url, eng, aeng = server
    eng.step_delay = 0.02
    try:
        with httpx.Client() as c:
            with c.stream("POST", url + "/v1/completions", json={"model": "fake", "prompt": "s", "max_tokens": 100,
                                                                 "stream": True, "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break
        assert _idle(aeng, eng)
        before = len(eng.aborted)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "n", "max_tokens": 100,
                                                      "ignore_eos": True}, timeout=0.3)
        assert _idle(aeng, eng)
        assert len(eng.aborted) == before + 1
    finally:
        eng.step_delay = 0.002


def test_metrics_prometheus_text(server):
    url, eng, aeng = server
    for _ in range(2):
        httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "m", "max_tokens": 3})
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]+="[^"]*",?)*\})? [-+0-9.eInf]+$')
    samples = {}
    for line in r.text.strip().splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) ferry_\w+ ", line), line
            continue
        assert sample.match(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    for q in range(4):
        assert f'ferry_requests_waiting{{model="fake",queue="{q}"}}' in samples
    for name in ("requests_running", "requests_swapped", "device_pages_used", "device_pages_total",
                 "host_pages_used", "preemptions_total", "demotions_total", "promotions_total",
                 "prompt_tokens_total", "generation_tokens_total", "requests_in_flight"):
        assert f'ferry_{name}{{model="fake"}}' in samples, name
    assert samples['ferry_generation_tokens_total{model="fake"}'] >= 6
    for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "request_completion_seconds"):
        buckets = [v for k, v in samples.items() if k.startswith(f"ferry_{h}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == samples[f'ferry_{h}_count{{model="fake"}}'] > 0


def test_200_concurrent_mixed_requests(server):
    url, eng, aeng = server

    async def one(client, i):
        want = 1 + i % 9
        body = {"model": "fake", "prompt": f"r{i}", "max_tokens": want, "ignore_eos": True, "seed": i}
        if i % 2:
            r = await client.post(url + "/v1/completions", json={**body, "stream": True,
                                                                  "stream_options": {"include_usage": True}})
            chunks = _sse(r)
            return chunks[-1]["usage"]["completion_tokens"], "".join(c["choices"][0]["text"] for c in chunks[:-1]), i
        r = await client.post(url + "/v1/completions", json=body)
        return r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["text"], i

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=250)) as client:
            return await asyncio.gather(*[one(client, i) for i in range(200)])

    for got, text, i in asyncio.run(main()):
        assert got == 1 + i % 9 and len(text) == got
    assert _idle(aeng, eng)


def test_full_waiting_room_503_and_health_after_shutdown():
    eng = FakeEngine(max_batch=1, step_delay=0.01)
    with serve(eng, max_waiting=1) as (url, aeng):
        async def main():
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": "fake", "prompt": "x", "max_tokens": 20, "ignore_eos": True}
                return await asyncio.gather(*[client.post(url + "/v1/completions", json=body) for _ in range(8)])

        rs = asyncio.run(main())
        codes = [r.status_code for r in rs]
        assert 503 in codes and 200 in codes and set(codes) == {200, 503}, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert int(busy.headers["retry-after"]) >= 1 and busy.json()["error"]["code"] == "overloaded"
        assert all(r.json()["usage"]["completion_tokens"] == 20 for r in rs if r.status_code == 200)
        assert httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "y", "max_tokens": 2}).status_code == 200
        aeng.shutdown(timeout=0.5)
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "y", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"


def test_load_test_script_reports_rates_and_percentiles(server, tmp_path):
    import importlib.util
    import os
    url, eng, aeng = server
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts", "load_test.py")
    spec = importlib.util.spec_from_file_location("ferry_load_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "load.json"
    res = mod.main(["--url", url, "--concurrency", "4", "--duration", "1", "--max-tokens", "5",
                    "--prompt-len", "3", "--output", str(out)])
    assert res["requests"] >= 4 and res["num_errors"] == 0 and res["model"] == "fake"
    assert res["output_tokens"] == 5 * res["requests"] and res["requests_per_s"] > 0
    assert 0 < res["ttft_p50"] <= res["ttft_p99"] and 0 < res["itl_p50"] <= res["itl_p99"]
    assert json.loads(out.read_text())["requests"] == res["requests"]
    assert _idle(aeng, eng)


def test_length_hint_reaches_the_engine(server):
    """The ``length_hint`` extension (predicted output tokens, read by the MLFQ) is passed to the engine
    for every choice of a completion and a chat request; absent, the engine gets None."""
    url, eng, aeng = server
    r = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "hint", "max_tokens": 3, "n": 2,
                                                   "length_hint": 40})
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    assert {k: v for k, v in eng.length_hints.items() if k.startswith(rid)} == {f"{rid}-0": 40, f"{rid}-1": 40}
    r = httpx.post(url + "/v1/chat/completions", json={"model": "fake", "max_tokens": 3, "length_hint": 7,
                                                        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert eng.length_hints[r.json()["id"] + "-0"] == 7
    r = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "none", "max_tokens": 2})
    assert eng.length_hints[r.json()["id"] + "-0"] is None
    assert _idle(aeng, eng)


@pytest.mark.parametrize("body,param,needle", [
    ({"prompt": {"a": 1}}, "prompt", "prompt must be a string"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens", "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature", "temperature must be >= 0"),
    ({"prompt": "x" * 100, "max_tokens": 50}, "prompt", "context length"),
    ({"prompt": "x", "model": "gpt-9"}, "model", "gpt-9"),
])
def test_error_json_names_the_parameter(server, body, param, needle):
    url, eng, aeng = server
    err = httpx.post(url + "/v1/completions", json={"model": "fake", **body}).json()["error"]
    assert err["param"] == param and needle in err["message"], err


def test_graceful_shutdown_finishes_short_and_aborts_long_streams():
    eng = FakeEngine(step_delay=0.01)
    holder, got = {}, {}
    with serve(eng, shutdown_timeout=0.5, holder=holder) as (url, aeng):
        def stream(name, max_tokens):
            with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
                    "model": "fake", "prompt": name, "max_tokens": max_tokens, "stream": True,
                    "ignore_eos": True}) as r:
                got[name] = r.read().decode()

        threads = [threading.Thread(target=stream, args=a) for a in (("short", 30), ("long", 110))]
        for t in threads:
            t.start()
        for _ in range(1000):
            if aeng.stats().get("running") == 2:
                break
            time.sleep(0.01)
        t0 = time.monotonic()
        holder["server"].should_exit = True
        for t in threads:
            t.join(30)
        assert time.monotonic() - t0 < 10
        finals = {}
        for name, text in got.items():
            events = [ln[6:] for ln in text.split("\n\n") if ln.startswith("data: ")]
            assert events[-1] == "[DONE]"
            finals[name] = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert finals["short"][-1]["finish_reason"] == "length"
        assert len("".join(c["text"] for c in finals["short"])) == 30
        assert finals["long"][-1]["finish_reason"] == "abort"
        assert len("".join(c["text"] for c in finals["long"])) < 110
        assert _wait_dead(aeng) and eng.stats()["device_pages_used"] == 0


def _wait_dead(aeng, timeout=10.0):
    t = time.time()
    while aeng.is_alive and time.time() - t < timeout:
        time.sleep(0.02)
    return not aeng.is_alive
