"""Hostile clients: property-based fuzzing of /v1/completions and /v1/chat/completions.

A real uvicorn server over the FakeEngine gets malformed JSON, wrong types,
extreme numbers, invalid UTF-8, huge prompts and random field combinations.
Every answer must be a complete HTTP response (never a dropped connection),
never a 5xx, and either a success of the right shape or an OpenAI error body;
after each burst a valid request still succeeds.
"""
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.entrypoints.fake_engine import FakeEngine
from tests.server.conftest import serve

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
VALID = {"/v1/completions": {"prompt": "hello", "max_tokens": 3},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}


@pytest.fixture(scope="module")
def server():
    eng = FakeEngine(max_model_len=128, max_batch=8, num_pages=512, step_delay=0.0)
    with serve(eng, max_waiting=10_000) as (url, aeng):
        with httpx.Client(base_url=url, timeout=30.0) as client:
            yield client, eng, aeng


# -- hostile values -----------------------------------------------------------------------------

EXTREME_INTS = st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, -2**31 - 1, 2**53 + 1, 2**63 - 1, 2**63, -2**63,
                                2**64, 10**30, -10**30])
EXTREME_FLOATS = st.sampled_from([0.0, -0.0, 1e-320, 1e308, -1e308, 3.5e38, 1e-45, 0.5, 2.0, -2.0, 1.0000001])
SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc80" * 3, "x\ud83d"])     # unpaired: not Unicode
STRINGS = st.one_of(st.text(max_size=20), SURROGATES,
                    st.sampled_from(["", "\x00", "eos", "<|im_start|>", "é" * 5, "\U0001F680"]))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), EXTREME_INTS, EXTREME_FLOATS,
                    st.floats(allow_nan=True, allow_infinity=True), STRINGS)
ANY = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(STRINGS, inner, max_size=3)), max_leaves=8)
HUGE = st.sampled_from(["a" * 200_000, list(range(50_000)), ["x"] * 5_000, [[5] * 10] * 2_000])
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "bot"]),
                           "content": st.one_of(STRINGS, st.none(), st.lists(
                               st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]),
                                                      "text": STRINGS}), max_size=2))}),
    ANY)

FIELDS = {
    "model": st.one_of(st.just("fake"), STRINGS, ANY), "prompt": st.one_of(STRINGS, st.lists(st.integers(-5, 400), max_size=8),
                                                                  st.lists(STRINGS, max_size=3), HUGE, ANY),
    "messages": st.one_of(st.lists(MESSAGE, max_size=3), st.just([{"role": "user", "content": "a" * 200_000}]), ANY),
    "max_tokens": st.one_of(st.integers(-3, 130), EXTREME_INTS, ANY),
    "max_completion_tokens": st.one_of(st.integers(-3, 130), EXTREME_INTS, ANY),
    "temperature": st.one_of(EXTREME_FLOATS, ANY), "top_p": st.one_of(EXTREME_FLOATS, ANY),
    "top_k": st.one_of(EXTREME_INTS, ANY), "min_p": st.one_of(EXTREME_FLOATS, ANY),
    "n": st.one_of(st.integers(-1, 70), ANY), "seed": st.one_of(EXTREME_INTS, ANY),
    "stop": st.one_of(STRINGS, st.lists(STRINGS, max_size=5), ANY),
    "stop_token_ids": st.one_of(st.lists(st.one_of(st.integers(0, 400), EXTREME_INTS), max_size=12), ANY),
    "presence_penalty": st.one_of(EXTREME_FLOATS, ANY), "frequency_penalty": st.one_of(EXTREME_FLOATS, ANY),
    "repetition_penalty": st.one_of(EXTREME_FLOATS, ANY), "stream": st.one_of(st.booleans(), ANY),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), ANY),
    "logprobs": st.one_of(st.integers(-1, 25), st.booleans(), ANY), "top_logprobs": st.one_of(st.integers(-1, 25), ANY),
    "echo": st.one_of(st.booleans(), ANY), "ignore_eos": st.one_of(st.booleans(), ANY),
    "priority": st.one_of(EXTREME_INTS, ANY), "user": ANY,
}

# values a real client would send, mixed in so that many requests pass validation and run
SANE = {"max_tokens": st.integers(1, 20), "max_completion_tokens": st.integers(1, 20),
        "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
        "min_p": st.floats(0, 1), "n": st.integers(1, 4), "seed": st.integers(0, 2**62),
        "stop": st.one_of(st.sampled_from(["a", "b", "eos"]), st.lists(STRINGS, max_size=4)),
        "stop_token_ids": st.lists(st.integers(0, 300), max_size=10),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.5, 2), "stream": st.booleans(), "logprobs": st.integers(0, 20),
        "top_logprobs": st.integers(0, 20), "echo": st.booleans(), "ignore_eos": st.booleans(),
        "priority": st.integers(-3, 10), "user": st.text(max_size=5), "model": st.just("fake")}


@st.composite
def json_body(draw, endpoint):
    """A valid request with a few sane extras, then one or two hostile fields (so each bug shows alone)."""
    body = dict(VALID[endpoint])
    for name in draw(st.lists(st.sampled_from(sorted(SANE)), max_size=4, unique=True)):
        body[name] = draw(SANE[name])
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=2, unique=True)):
        body[name] = draw(FIELDS[name])
    if draw(st.integers(0, 7)) == 0:
        for name in draw(st.lists(st.sampled_from(sorted(body)), min_size=1, max_size=2, unique=True)):
            del body[name]                                     # drop required fields too
    # NaN / Infinity literals included; unpaired surrogates either \u-escaped (valid JSON, not Unicode)
    # or raw (invalid UTF-8 bytes)
    text = json.dumps(body, allow_nan=True, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", errors="surrogatepass")


RAW = st.one_of(
    st.binary(max_size=64),                                     # not JSON, not UTF-8
    st.sampled_from([b"", b"{", b"[]", b"null", b"1", b'"x"', b'{"prompt": "a",}', b'{"prompt": "\\ud800"}',
                     b'{"prompt": "\xff\xfe"}', b'{"messages": [{"role": "user", "content": "\xc3"}]}',
                     b'{"prompt": NaN}', b'{"prompt": "a", "max_tokens": 1e999}', b"[" * 5000 + b"]" * 5000,
                     b'{"prompt": "a", "prompt": 3}', b'\xef\xbb\xbf{"prompt": "a"}']),
)


@st.composite
def burst(draw):
    requests = []
    for _ in range(draw(st.integers(1, 3))):
        endpoint = draw(st.sampled_from(ENDPOINTS))
        payload = draw(RAW if draw(st.integers(0, 4)) == 0 else json_body(endpoint))
        ctype = draw(st.sampled_from(["application/json"] * 8 + ["text/plain", None]))
        requests.append((endpoint, payload, ctype))
    return requests


def _check_error_body(r: httpx.Response) -> None:
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), body
    assert "param" in err and "code" in err and "Traceback" not in err["message"], body


def _check_success(r: httpx.Response, endpoint: str) -> None:
    if r.headers["content-type"].startswith("text/event-stream"):
        blocks = r.text.split("\n\n")
        assert blocks[-1] == "" and blocks[-2] == "data: [DONE]", r.text[-300:]
        for b in blocks[:-2]:
            assert b.startswith("data: "), b
            event = json.loads(b[6:])
            assert "choices" in event or "error" in event, event
        return
    body = r.json()
    want = "text_completion" if endpoint == "/v1/completions" else "chat.completion"
    assert body.get("object") == want and isinstance(body["choices"], list) and body["choices"], body


def _send(client: httpx.Client, endpoint: str, payload: bytes, ctype: str | None) -> httpx.Response:
    headers = {"content-type": ctype} if ctype else {}
    return client.post(endpoint, content=payload, headers=headers)   # a dropped connection raises here


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(requests=burst())
def test_hostile_requests_never_break_the_server(server, requests):
    client, eng, aeng = server
    for endpoint, payload, ctype in requests:
        r = _send(client, endpoint, payload, ctype)
        assert r.status_code < 500, (endpoint, payload[:300], r.status_code, r.text[:500])
        if r.status_code >= 400:
            _check_error_body(r)
        else:
            assert r.status_code == 200, (r.status_code, r.text[:300])
            _check_success(r, endpoint)
    for endpoint in ENDPOINTS:                                  # a valid request still succeeds
        r = client.post(endpoint, json=VALID[endpoint])
        assert r.status_code == 200, r.text
        _check_success(r, endpoint)


def test_positive_controls(server):
    """The checks above can fail: a known-bad request is a 400 error body, a known-good one a success."""
    client, eng, aeng = server
    bad = _send(client, "/v1/completions", b"{", "application/json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    with pytest.raises(AssertionError):
        _check_success(bad, "/v1/completions")
    good = _send(client, "/v1/chat/completions", json.dumps(VALID["/v1/chat/completions"]).encode(),
                 "application/json")
    assert good.status_code == 200
    with pytest.raises(AssertionError):
        _check_error_body(good)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_found_by_fuzzing_unpaired_surrogates_and_stop_id_limit(server, endpoint):
    """Regression: an unpaired surrogate in any string (model, messages, prompt, stop) was a 500;
    more stop ids than the device checks were silently dropped. Both are 400s naming the field now."""
    client, eng, aeng = server
    valid = json.dumps(VALID[endpoint])[:-1]                    # without the closing brace
    for field, raw in (("model", r'"\ud800"'), ("stop", r'["a\udfff"]'), ("user", r'"\udc80"')):
        r = _send(client, endpoint, f'{valid}, "{field}": {raw}}}'.encode(), "application/json")
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert "surrogate" in r.json()["error"]["message"]
    r = client.post(endpoint, json={**VALID[endpoint], "stop_token_ids": list(range(10, 19))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text
    r = client.post(endpoint, json={**VALID[endpoint], "stop_token_ids": list(range(10, 17))})   # positive control
    assert r.status_code == 200, r.text
