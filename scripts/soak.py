"""Soak test a running Ferry server: N clients mixing good, cancelled and bad requests for a bounded time.

usage: python scripts/soak.py http://127.0.0.1:8000 [--clients 16] [--duration 60] [--max-tokens 16] \
           [--pid SERVER_PID] [--api-key KEY] [--drain-timeout 30] [--output soak.json]

Each client loops until the deadline, picking at random: a streaming or non-streaming completion
or chat completion (read to the end and checked), a cancellation (a stream closed after its first
chunk, or a non-streaming request abandoned after a few milliseconds), or a bad request (malformed
JSON, wrong types, out-of-range values, an unknown model, a prompt over the context length: each must
get a 4xx with an OpenAI error body). Afterwards it waits until the server is idle and reads
``/metrics``: the KV pages in use on the device and in host memory must be back to 0.

Reports requests served by kind, errors by kind (anything a well-behaved server must not do: a 5xx,
a dropped connection, an error event or a missing ``data: [DONE]`` in a good stream, a 2xx for a bad
request), pages leaked and, with ``--pid``, the server's resident memory (VmRSS) growth between
the first and the last second of the run. Exits 1 if any error or leaked page was seen.

Only loopback URLs are accepted (127.0.0.0/8, ::1, localhost): it is meant for a server you run.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import re
import sys
import time
import urllib.parse

import httpx

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
KINDS = {"stream": 3, "non_stream": 3, "cancel_stream": 1, "cancel_request": 1, "bad": 2}
_PAGES = re.compile(r"^\w*(device|host)_pages_used(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)


def check_loopback(url: str) -> str:
    """The URL without a trailing slash; ValueError unless it names a loopback host."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if host != "localhost":
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"soak.py only targets a loopback server (127.0.0.1, ::1, localhost), got {host!r}")
    return url.rstrip("/")


def pages_used(metrics_text: str) -> dict[str, float]:
    """{"device": n, "host": n}: KV pages in use, summed over label sets, from Prometheus text."""
    out = {"device": 0.0, "host": 0.0}
    for where, value in _PAGES.findall(metrics_text):
        out[where] += float(value)
    return out


def rss_kib(pid: int) -> int | None:
    """Resident set size of ``pid`` in KiB (Linux /proc), or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _bad_request(rng: random.Random, model: str) -> tuple[str, bytes]:
    path = rng.choice(["/v1/completions", "/v1/chat/completions"])
    prompt = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    bodies = [
        b"{not json",
        json.dumps({**prompt, "model": model, "max_tokens": "many"}).encode(),
        json.dumps({**prompt, "model": model, "temperature": -3}).encode(),
        json.dumps({**prompt, "model": model, "top_p": 7}).encode(),
        json.dumps({**prompt, "model": "no-such-model"}).encode(),
        json.dumps({**prompt, "model": model, "n": 0}).encode(),
        json.dumps({"model": model, "max_tokens": 4}).encode(),                      # no prompt / messages
        json.dumps({**prompt, "model": model, "max_tokens": 10**9}).encode(),        # over the context
        json.dumps({**prompt, "model": model, "stop_token_ids": list(range(64))}).encode(),
        b'{"prompt": "\xff\xfe", "messages": "\\ud800"}',
    ]
    return path, rng.choice(bodies)


def _good_body(rng: random.Random, args, stream: bool) -> tuple[str, dict]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, args.prompt_len)))
    body = {"model": args.model, "max_tokens": rng.randint(1, args.max_tokens), "stream": stream,
            "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": rng.randrange(2**31)}
    if rng.random() < 0.3:
        body["stop"] = [rng.choice(WORDS)[:2]]
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        return "/v1/completions", {**body, "prompt": text}
    return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}


class Tally:
    def __init__(self) -> None:
        self.served: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.examples: list[str] = []

    def ok(self, kind: str) -> None:
        self.served[kind] = self.served.get(kind, 0) + 1

    def error(self, key: str, detail: str = "") -> None:
        self.errors[key] = self.errors.get(key, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{key}: {detail[:200]}")


def _is_error_body(r: httpx.Response) -> bool:
    try:
        err = r.json()["error"]
        return isinstance(err["message"], str) and isinstance(err["type"], str)
    except (ValueError, KeyError, TypeError):
        return False


async def _stream(client, path, body, tally: Tally, cancel: bool) -> None:
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            tally.error(f"http_{r.status_code}", r.text)
            return
        events = []
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                tally.error("bad_sse_line", line)
                return
            events.append(line[6:])
            if cancel:                      # leave after the first event: the server must abort the request
                tally.ok("cancel_stream")
                return
        if not events or events[-1] != "[DONE]":
            tally.error("stream_without_done", events[-1] if events else "")
            return
        for e in events[:-1]:
            if "error" in json.loads(e):
                tally.error("stream_error_event", e)
                return
        tally.ok("stream")


async def _one(client, rng: random.Random, args, tally: Tally) -> None:
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    try:
        if kind in ("stream", "cancel_stream"):
            path, body = _good_body(rng, args, stream=True)
            await _stream(client, path, body, tally, cancel=kind == "cancel_stream")
        elif kind == "non_stream":
            path, body = _good_body(rng, args, stream=False)
            r = await client.post(path, json=body)
            if r.status_code != 200 or not r.json().get("choices"):
                tally.error(f"http_{r.status_code}", r.text)
            else:
                tally.ok(kind)
        elif kind == "cancel_request":
            path, body = _good_body(rng, args, stream=False)
            body["max_tokens"] = args.max_tokens
            try:
                await asyncio.wait_for(client.post(path, json=body), timeout=rng.uniform(0.001, 0.02))
            except asyncio.TimeoutError:
                pass
            tally.ok(kind)
        else:
            path, payload = _bad_request(rng, args.model)
            r = await client.post(path, content=payload, headers={"content-type": "application/json"})
            if not 400 <= r.status_code < 500:
                tally.error(f"bad_request_got_{r.status_code}", payload.decode("utf-8", "replace"))
            elif not _is_error_body(r):
                tally.error("bad_request_without_error_body", r.text)
            else:
                tally.ok(kind)
    except httpx.HTTPError as e:
        tally.error(f"transport_{type(e).__name__}", str(e))
    except (ValueError, KeyError) as e:
        tally.error("unparseable_response", repr(e))


async def _client(client, rng, args, deadline: float, tally: Tally) -> None:
    while time.monotonic() < deadline:
        await _one(client, rng, args, tally)


async def _wait_idle(client, timeout: float) -> dict[str, float]:
    """Poll /metrics until no KV page is in use (or timeout); return the last reading."""
    end = time.monotonic() + timeout
    while True:
        pages = pages_used((await client.get("/metrics")).text)
        if (pages["device"] == 0 and pages["host"] == 0) or time.monotonic() > end:
            return pages
        await asyncio.sleep(0.1)


async def run_soak(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    tally = Tally()
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=httpx.Timeout(args.timeout),
                                 limits=httpx.Limits(max_connections=args.clients + 8)) as client:
        if args.model is None:
            args.model = (await client.get("/v1/models")).json()["data"][0]["id"]
        rss_start = rss_kib(args.pid) if args.pid else None
        t0 = time.monotonic()
        deadline = t0 + args.duration
        await asyncio.gather(*(_client(client, random.Random(args.seed + i), args, deadline, tally)
                               for i in range(args.clients)))
        wall = time.monotonic() - t0
        pages = await _wait_idle(client, args.drain_timeout)
        rss_end = rss_kib(args.pid) if args.pid else None
    leaked = int(pages["device"] + pages["host"])
    return {"url": args.url, "model": args.model, "clients": args.clients, "duration_s": args.duration,
            "wall_s": round(wall, 3), "served": tally.served, "requests_served": sum(tally.served.values()),
            "errors": tally.errors, "num_errors": sum(tally.errors.values()), "error_examples": tally.examples,
            "device_pages_leaked": int(pages["device"]), "host_pages_leaked": int(pages["host"]),
            "pages_leaked": leaked, "server_pid": args.pid,
            "rss_start_mib": None if rss_start is None else round(rss_start / 1024, 1),
            "rss_end_mib": None if rss_end is None else round(rss_end / 1024, 1),
            "rss_growth_mib": None if rss_start is None or rss_end is None
            else round((rss_end - rss_start) / 1024, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="base URL of a loopback server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds during which clients start requests")
    ap.add_argument("--max-tokens", type=int, default=16, help="largest max_tokens of a good request")
    ap.add_argument("--prompt-len", type=int, default=24, help="most words per prompt")
    ap.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    ap.add_argument("--pid", type=int, default=None, help="server process id: report its resident memory growth")
    ap.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    ap.add_argument("--drain-timeout", type=float, default=30.0,
                    help="seconds to wait after the run for every KV page to be freed")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.max_tokens < 1 or args.prompt_len < 1:
        ap.error("--clients, --duration, --max-tokens and --prompt-len must be positive")
    try:
        args.url = check_loopback(args.url)
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv: list[str] | None = None) -> tuple[dict, int]:
    """Run the soak test; print and return (report, exit code: 1 on any error or leaked page)."""
    args = parse_args(argv)
    report = asyncio.run(run_soak(args))
    print(json.dumps(report, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return report, int(report["num_errors"] > 0 or report["pages_leaked"] > 0)


if __name__ == "__main__":
    sys.exit(main()[1])
