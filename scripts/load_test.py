"""Load test an OpenAI-compatible server with N concurrent streaming clients for a bounded time.

usage: python scripts/load_test.py --url http://127.0.0.1:8000 --concurrency 32 --duration 30 \
           [--max-tokens 64] [--prompt-len 32] [--chat] [--output result.json]

Each client loops until the deadline: send one streaming request (``stream_options.include_usage``
so the server reports exact token counts), read it to ``data: [DONE]``, repeat. Reports
requests/s, output tokens/s, TTFT and inter-token latency p50/p90/p99 (seconds, measured at
the client from SSE arrival times) and errors by kind (HTTP status, error event, transport).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx
import numpy as np

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def _count(errors: dict, key: str) -> None:
    errors[key] = errors.get(key, 0) + 1


async def _one_request(client: httpx.AsyncClient, url: str, body: dict, rec: dict) -> None:
    """Send one streaming request and record its latencies, tokens or error."""
    t0 = time.monotonic()
    first = last = None
    usage = None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                _count(rec["errors"], f"http_{r.status_code}")
                await asyncio.sleep(float(r.headers.get("retry-after", 0.2)) if r.status_code == 503 else 0.2)
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    _count(rec["errors"], "stream_error")
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                if not any(c.get("text") or (c.get("delta") or {}).get("content") for c in choices):
                    continue                       # role / finish / usage chunks carry no token
                now = time.monotonic()
                if first is None:
                    first = now
                    rec["ttft"].append(now - t0)
                else:
                    rec["itl"].append(now - last)
                last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        _count(rec["errors"], type(e).__name__)
        return
    rec["done"] += 1
    rec["tokens"] += usage["completion_tokens"] if usage else 0


async def _client_loop(client, args, deadline: float, rec: dict, rng: random.Random) -> None:
    path = "/v1/chat/completions" if args.chat else "/v1/completions"
    while time.monotonic() < deadline:
        prompt = " ".join(rng.choice(WORDS) for _ in range(args.prompt_len))
        body = {"model": args.model, "max_tokens": args.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0.8, "ignore_eos": True,
                "seed": rng.randrange(2 ** 31)}
        if args.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        await _one_request(client, args.url + path, body, rec)


def _pct(xs, q) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


async def run_load_test(args: argparse.Namespace, progress: bool = True) -> dict:
    """Run the load test described by ``args`` (see ``parse_args``); return the summary dict."""
    rec = {"ttft": [], "itl": [], "errors": {}, "done": 0, "tokens": 0}
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout),
                                 limits=httpx.Limits(max_connections=args.concurrency + 8)) as client:
        if args.model is None:
            args.model = (await client.get(args.url + "/v1/models")).json()["data"][0]["id"]
        t0 = time.monotonic()
        deadline = t0 + args.duration
        tasks = [asyncio.ensure_future(_client_loop(client, args, deadline, rec, random.Random(args.seed + i)))
                 for i in range(args.concurrency)]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=round(args.duration), unit="s", desc=f"load x{args.concurrency}")
        while not all(t.done() for t in tasks):
            await asyncio.sleep(1.0)
            if bar is not None:
                bar.n = min(round(args.duration), round(time.monotonic() - t0))
                bar.set_postfix(done=rec["done"], errors=sum(rec["errors"].values()))
        if bar is not None:
            bar.close()
        await asyncio.gather(*tasks)
    wall = time.monotonic() - t0
    return {"url": args.url, "model": args.model, "concurrency": args.concurrency, "duration_s": args.duration,
            "wall_s": wall, "requests": rec["done"], "requests_per_s": rec["done"] / wall,
            "output_tokens": rec["tokens"], "output_tokens_per_s": rec["tokens"] / wall,
            "ttft_p50": _pct(rec["ttft"], 50), "ttft_p90": _pct(rec["ttft"], 90), "ttft_p99": _pct(rec["ttft"], 99),
            "itl_p50": _pct(rec["itl"], 50), "itl_p90": _pct(rec["itl"], 90), "itl_p99": _pct(rec["itl"], 99),
            "errors": rec["errors"], "num_errors": sum(rec["errors"].values())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent streaming clients")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds during which clients start requests")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32, help="words per prompt")
    ap.add_argument("--chat", action="store_true", help="use /v1/chat/completions instead of /v1/completions")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="write the summary as JSON here")
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.max_tokens < 1 or args.prompt_len < 1:
        ap.error("--concurrency, --duration, --max-tokens and --prompt-len must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    res = asyncio.run(run_load_test(args))
    for k, v in res.items():
        print(f"{k:>20}: {v:.4f}" if isinstance(v, float) else f"{k:>20}: {v}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
