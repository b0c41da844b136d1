"""The ``ferry`` command: generate, serve, convert. Flags come from ``EngineConfig`` / ``ServerConfig``."""
from __future__ import annotations

import argparse
import sys

from ferry.engine.config import EngineConfig
from ferry.engine.entrypoints.args import add_arguments, config_from_args
from ferry.engine.server.config import ServerConfig

# One prompt: a small engine (one batch slot, a 1k context) that compiles only the programs the
# prompt needs, when it needs them (or loads them from the executable cache).
GENERATE_DEFAULTS = {"max_batch": 1, "max_model_len": 1024, "warmup": "lazy"}


def _generate(args) -> int:
    from ferry.engine.entrypoints.llm import LLM
    from ferry.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.request_seed)
    cfg = config_from_args(EngineConfig, args, **GENERATE_DEFAULTS)
    llm = LLM(config=cfg)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    llm.close()
    if cfg.process_id != 0:
        return 0                     # multi-host: only process 0 prints
    print(out.text)
    if args.verbose:
        t, eng = out.timings, getattr(llm.engine, "engine", llm.engine)
        progs = eng.runner.program_stats()
        built = sum(p["compiled"] for p in progs.values())
        compile_s = sum(p["seconds"] for p in progs.values())
        print(f"[{out.num_prompt_tokens} prompt tokens, {out.num_output_tokens} generated, "
              f"finish={out.finish_reason}, load={eng.timings['load_seconds']:.2f}s, "
              f"programs={built} built in {compile_s:.2f}s (persistent cache: {eng.config.compile_cache_dir}), "
              f"ttft={t.first_token - t.arrival:.3f}s (compiles included), "
              f"total={t.finish - t.arrival:.3f}s]", file=sys.stderr)
    return 0


def _serve(args) -> int:
    from ferry.engine.server.app import run_server       # fastapi / uvicorn: only when serving
    engine_config, server_config = serve_configs(args)
    run_server(engine_config, server_config)
    return 0


def serve_configs(args) -> tuple[EngineConfig, ServerConfig]:
    """``ferry serve``'s settings: ``MODEL`` (positional, as ``vllm serve MODEL``) or ``--model``."""
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"two models given: {args.model_tag!r} (positional) and --model {args.model!r}")
        args.model = args.model_tag
    return config_from_args(EngineConfig, args), config_from_args(ServerConfig, args)


def _convert(args) -> int:
    from ferry.models.convert import convert
    convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ferry", description="Ferry LLM inference engine")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt",
                       description="generate text for one prompt (engine defaults: "
                                   + ", ".join(f"{k}={v}" for k, v in GENERATE_DEFAULTS.items()) + ")")
    g.add_argument("prompt")
    add_arguments(g, EngineConfig)
    r = g.add_argument_group("request")
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", dest="request_seed", type=int, default=None, help="sampling seed of this request")
    r.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the model's chat template (default on; --no-chat for raw)")
    r.add_argument("-v", "--verbose", action="store_true", help="print token counts and timings")
    g.set_defaults(fn=_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                       description="OpenAI-compatible HTTP server. vLLM's flag names work too "
                                   "(--max-num-seqs, --tensor-parallel-size, --gpu-memory-utilization, "
                                   "--swap-space, --served-model-name, --api-key, ...).")
    s.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as --model (vLLM's `serve MODEL`)")
    add_arguments(s, EngineConfig)
    add_arguments(s, ServerConfig)
    s.set_defaults(fn=_serve)

    c = sub.add_parser("convert", help="convert a GGUF file or HF directory to a Ferry Orbax checkpoint")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    c.set_defaults(fn=_convert)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
