"""API keys over a real uvicorn server on 127.0.0.1 (FakeEngine): the official openai client and raw httpx."""
import httpx
import openai
import pytest
from tests.entrypoints.fake_engine import FakeEngine
from tests.server.conftest import serve

from ferry.engine.server.auth import bearer_token, is_loopback, open_binding_warning

KEY = "sk-ferry-test-0123456789"


class _CountingEngine(FakeEngine):
    """FakeEngine that records every request that reaches it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.added: list[str] = []

    def add_request(self, request_id, *args, **kwargs):
        self.added.append(request_id)
        return super().add_request(request_id, *args, **kwargs)


@pytest.fixture(scope="module")
def keyed():
    eng = _CountingEngine(max_model_len=128, max_batch=4, num_pages=64)
    with serve(eng, api_key=KEY) as (url, aeng):
        yield url, eng


def test_openai_client_right_key_works_wrong_or_missing_key_gets_401(keyed):
    url, eng = keyed
    good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == ["fake"]
    out = good.completions.create(model="fake", prompt="hello", max_tokens=4, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens == 4
    chunks = list(good.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    reached = len(eng.added)
    assert reached == 2                                       # positive control: keyed requests reach it

    for wrong in ("sk-wrong", KEY + "x", KEY[:-1]):
        bad = openai.OpenAI(base_url=url + "/v1", api_key=wrong, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as ei:
            bad.completions.create(model="fake", prompt="hello", max_tokens=4)
        assert ei.value.status_code == 401
        assert ei.value.body["code"] == "invalid_api_key" and ei.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], stream=True)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert len(eng.added) == reached                          # refused requests never reached the engine


def test_raw_headers_every_v1_route_is_guarded(keyed):
    url, eng = keyed
    reached = len(eng.added)
    body = {"model": "fake", "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY},
                    {"Authorization": "Bearer"}, {"Authorization": "Bearer " + KEY.upper()}):
        r = httpx.post(url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"].startswith("Bearer")
    # unknown routes and methods under /v1 answer 401 too (nothing about the API leaks without the key)
    assert httpx.get(url + "/v1/nope").status_code == 401
    assert httpx.get(url + "/v1/completions").status_code == 401
    assert httpx.get(url + "/v1").status_code == 401
    # malformed JSON without a key: 401, not 400 (the key is checked before the body is read)
    assert httpx.post(url + "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
                      ).status_code == 401
    assert len(eng.added) == reached
    # positive controls with the key: the same routes answer as without auth
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(url + "/v1/nope", headers=auth).status_code == 404
    assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
    assert httpx.post(url + "/v1/completions", json=body, headers={"authorization": f"bearer {KEY}"}
                      ).status_code == 200                   # scheme is case-insensitive, as RFC 7235
    assert len(eng.added) == reached + 1


def test_health_and_metrics_stay_open_by_default(keyed):
    url, _ = keyed
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and "ferry_requests_running" in r.text


def test_metrics_closed_by_flag():
    with serve(FakeEngine(), api_key=KEY, metrics_require_api_key=True) as (url, _):
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and "ferry_requests_running" in r.text
        assert httpx.get(url + "/health").status_code == 200


def test_no_key_means_open_server():
    with serve(FakeEngine()) as (url, _):
        r = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="anything", max_retries=0)
        assert client.models.list().data[0].id == "fake"


def test_bearer_parsing():
    assert bearer_token(b"Bearer abc") == b"abc"
    assert bearer_token(b"bearer   abc ") == b"abc"
    for bad in (None, b"", b"abc", b"Basic abc", b"Bearer", b"Bearer   "):
        assert bearer_token(bad) is None, bad


def test_open_binding_warning_only_for_reachable_hosts_without_key():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and open_binding_warning(host, None) is None, host
    for host in ("0.0.0.0", "::", "10.1.2.3", "my-host.example"):
        assert not is_loopback(host)
        assert "without an API key" in open_binding_warning(host, None), host
        assert open_binding_warning(host, KEY) is None, host


def test_server_config_never_prints_the_key(monkeypatch):
    from ferry.engine.server.config import ServerConfig
    sc = ServerConfig(api_key=KEY)
    assert KEY not in repr(sc) and KEY not in str(sc) and sc.resolved_api_key() == KEY
    monkeypatch.delenv("FERRY_API_KEY", raising=False)
    assert ServerConfig().resolved_api_key() is None
    with pytest.raises(ValueError, match="api_key must not be empty"):
        ServerConfig(api_key=" ")
