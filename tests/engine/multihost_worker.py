"""One process of the two-process test (tests/engine/test_tensor_parallel.py); not collected by pytest.

usage: python tests/engine/multihost_worker.py PORT PROCESS_ID NUM_PROCESSES TP MODEL [diverge]
Prints one JSON line with the greedy tokens of PROMPTS (process 0 and followers alike).
``diverge``: process 1 plans with max_batch 1 (its plans differ from the leader's) and every
process prints ``DIVERGED <message>`` when the engine raises.
"""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

PROMPTS = [[5, 9, 14], list(range(30, 70)), [100, 3, 250, 77, 9, 11, 400]]


def main() -> None:
    port, pid, nproc, tp, model = sys.argv[1:6]
    from ferry.engine.entrypoints.llm import LLM
    from ferry.engine.sampling_params import SamplingParams

    llm = LLM(model=model, tensor_parallel=int(tp), max_batch=4, max_model_len=128, max_prefill_chunk=32,
              num_pages=48, warmup_progress=False, compile_cache_dir=None, strict_compile_guard=True,
              coordinator_address=f"127.0.0.1:{port}", num_processes=int(nproc), process_id=int(pid))
    if sys.argv[6:] == ["diverge"]:
        import dataclasses
        from ferry.engine.distributed import PlanDivergence
        if int(pid) == 1:
            sched = llm.engine.scheduler
            sched.cfg = dataclasses.replace(sched.cfg, max_batch=1)
        try:
            llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        except PlanDivergence as e:
            print(f"DIVERGED {e}", flush=True)
            os._exit(3)                  # no orderly shutdown: the other process may be gone
        print("NOT DIVERGED", flush=True)
        os._exit(0)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    seeded = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=8,
                                                      ignore_eos=True))
    llm.close()
    print("RESULT " + json.dumps({"pid": int(pid), "greedy": [list(o.token_ids) for o in outs],
                                  "seeded": [list(o.token_ids) for o in seeded],
                                  "violations": llm.engine.guard.violations}), flush=True)


if __name__ == "__main__":
    main()
