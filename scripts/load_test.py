"""Load test an OpenAI-compatible server with N concurrent streaming clients for a bounded time.

usage: python scripts/load_test.py --url http://127.0.0.1:8000 --concurrency 32 --duration 30 \
           [--max-tokens 64] [--prompt-len 32] [--output result.json]
Reports requests/s, output tokens/s, TTFT and inter-token latency percentiles, and errors.
"""
import argparse
import asyncio
import json
import random
import time

import httpx
import numpy as np

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


async def client_loop(client, args, deadline, rec, rng):
    while time.monotonic() < deadline:
        prompt = " ".join(rng.choice(WORDS) for _ in range(args.prompt_len))
        body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "stream": True,
                "temperature": 0.8, "ignore_eos": True}
        t0 = time.monotonic()
        last, first, n = None, None, 0
        try:
            async with client.stream("POST", args.url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    rec["errors"][str(r.status_code)] = rec["errors"].get(str(r.status_code), 0) + 1
                    await r.aread()
                    await asyncio.sleep(0.2)
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.monotonic()
                    if first is None:
                        first = now
                        rec["ttft"].append(now - t0)
                    else:
                        rec["itl"].append(now - last)
                    last = now
                    n += 1
        except httpx.HTTPError as e:
            rec["errors"][type(e).__name__] = rec["errors"].get(type(e).__name__, 0) + 1
            continue
        rec["done"] += 1
        rec["tokens"] += n


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


async def main_async(args):
    rec = {"ttft": [], "itl": [], "errors": {}, "done": 0, "tokens": 0}
    if args.model is None:
        args.model = httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
    deadline = time.monotonic() + args.duration
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=args.concurrency + 8)) as c:
        await asyncio.gather(*[client_loop(c, args, deadline, rec, random.Random(i)) for i in range(args.concurrency)])
    wall = time.monotonic() - t0
    return {"concurrency": args.concurrency, "wall_s": wall, "requests": rec["done"],
            "requests_per_s": rec["done"] / wall, "output_tok_s": rec["tokens"] / wall,
            "ttft_p50": pct(rec["ttft"], 50), "ttft_p90": pct(rec["ttft"], 90), "ttft_p99": pct(rec["ttft"], 99),
            "itl_p50": pct(rec["itl"], 50), "itl_p90": pct(rec["itl"], 90), "itl_p99": pct(rec["itl"], 99),
            "errors": rec["errors"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32, help="words per prompt")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    for k, v in res.items():
        print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
