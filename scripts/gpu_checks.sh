#!/usr/bin/env bash
# Every GPU check and measurement Ferry owes, in one device call that fits in 8 minutes on an H200.
#
#   bash scripts/gpu_checks.sh            # on the lent GPU, from anywhere in the repository
#
# 1. JAX must see a GPU: otherwise it exits at once (status 2) and measures nothing.
# 2. Kernel self-check (python -m ferry.kernels.selection): each Pallas kernel compiled and compared
#    with its reference, as the engine does at start-up (plus the opt-in Mosaic GPU decode variant);
#    a fallback is reported, not fatal.
#    Then the engine itself, Pallas against references: greedy tokens side by side
#    (scripts/gpu_engine_parity.py, random tiny model).
# 3. Kernel benchmarks (scripts/bench_kernels.py), one process per section, attention first.
# 4. The scheduler's cost model fitted on the engine (scripts/profile_cost_model.py, random weights
#    of Llama-3-8B's shape, batch 32, as the scheduler sweep's "gpu" profile assumes).
# 5. Decode benchmarks, Llama-3.2-1B shape (Ferry and HF) then Llama-3-8B shape (Ferry only),
#    batches 1, 16, 64, with the memory roofline measured in the same process; the sampling
#    benchmark at Llama-3's vocabulary (synthetic logits: no weights on the device).
# 6. Decode variants (Llama-3.2-1B shape): where the time past the weights' read goes.
# Steps run in priority order (what an issue is waiting on first).
# 7. scripts/gpu_summary.py: one table, each issue target beside its measurement.
#
# Every step has its own timeout, capped by what is left of the total budget (GPU_CHECKS_BUDGET,
# default 450 s, so the whole script stays under 8 minutes including start-up); a step whose time
# runs out is killed and the next one starts. Every step writes its JSON under $OUT (the device
# tool's folder; default benchmarks/results/gpu) as soon as it has numbers: a killed step keeps
# its finished rows. The device image has no gguf / fastapi / uvicorn; no step imports them.
#
# The device tool brings back at most 8 files from $OUT. For it, set GPU_CHECKS_PACK to that folder
# and OUT to a scratch folder: after every step the results so far are packed into
# $GPU_CHECKS_PACK/gpu_results.tar (and the log copied there), so a killed run keeps them too:
#
#   pack=$OUT; OUT=/tmp/gpu GPU_CHECKS_PACK=$pack bash scripts/gpu_checks.sh
#
# PYTHON (default python3: on the device image a bare `python` may be missing or another one);
# GPU_CHECKS_ONLY="selfcheck decode_llama-3.2-1b": run only the named steps (a rerun after a fix).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
out=${OUT:-benchmarks/results/gpu}
pack=${GPU_CHECKS_PACK:-}
budget=${GPU_CHECKS_BUDGET:-450}
only=${GPU_CHECKS_ONLY:-}
mkdir -p "$out"
log="$out/gpu_checks.log"
: > "$log"
: > "$out/steps.txt"

# pack_results: the results so far as one tar beside a copy of the log (no-op without GPU_CHECKS_PACK).
pack_results() {
    [ -n "$pack" ] || return 0
    mkdir -p "$pack"
    tar -C "$out" -cf "$pack/gpu_results.tar.tmp" . && mv "$pack/gpu_results.tar.tmp" "$pack/gpu_results.tar"
    cp "$log" "$pack/gpu_checks.log"
}

backend=$(timeout 90 "$py" -c "import jax; print(jax.default_backend())" 2>>"$log" | tail -n 1)
if [ "$backend" != "gpu" ]; then
    echo "gpu_checks.sh: JAX's backend is '${backend:-unknown}', not a GPU: nothing measured." \
         "This script needs a CUDA jaxlib and a visible NVIDIA GPU (see $log)." | tee -a "$log" >&2
    exit 2
fi
tag=$("$py" -c "import jax; print(jax.devices()[0].device_kind.lower().replace(' ', '_'))" 2>>"$log")
echo "device: $tag; budget ${budget}s" | tee -a "$log"
"$py" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" 2>&1 | tee -a "$log"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used,memory.total \
    --format=csv 2>&1 | tee -a "$log"

# step NAME CAP_SECONDS CMD...: run CMD under min(CAP, budget left), log it, record "NAME rc seconds".
step() {
    local name=$1 cap=$2
    shift 2
    if [ -n "$only" ] && [[ " $only " != *" $name "* ]]; then
        echo "$name not_selected 0" >> "$out/steps.txt"
        return
    fi
    local left=$((budget - SECONDS))
    local t=$((cap < left ? cap : left))
    if ((t < 15)); then
        echo "== $name: skipped, budget spent" | tee -a "$log"
        echo "$name skipped 0" >> "$out/steps.txt"
        return
    fi
    echo "== $name (timeout ${t}s): $*" | tee -a "$log"
    local t0=$SECONDS
    timeout -k 5 "$t" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$log"
    echo "$name $rc $((SECONDS - t0))" >> "$out/steps.txt"
    pack_results
}

step selfcheck 60 "$py" -m ferry.kernels.selection --with-mosaic-gpu --output "$out/selection_$tag.json"
step engine_parity 60 "$py" scripts/gpu_engine_parity.py --output "$out/engine_parity_$tag.json"
step kernels_attention 110 "$py" scripts/bench_kernels.py --sections attention --output "$out/kernels_attention_$tag.json"
# The scheduler's cost model on a real deployment shape (the simulator's "gpu" profile is otherwise assumed).
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 step cost_model_llama-3-8b 150 "$py" scripts/profile_cost_model.py \
    --model random:llama-3-8b --max-batch 32 --max-model-len 1024 --repeats 3 \
    --output "$out/cost_model_llama-3-8b_$tag.json"
# JAX would preallocate 75% of the GPU; HF's torch model shares it in the decode benchmark.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 step decode_llama-3.2-1b 120 "$py" scripts/bench_decode.py --shape llama-3.2-1b \
    --batches 1,16,64 --repeats 1 --output "$out/decode_llama-3.2-1b_$tag.json"
step kernels_compaction 35 "$py" scripts/bench_kernels.py --sections compaction --output "$out/kernels_compaction_$tag.json"
step sampling 40 "$py" scripts/bench_sampling.py --synthetic --vocab 128256 --batch 64 --repeats 5 \
    --output "$out/sampling_$tag.json"
step kernels_kv_write 35 "$py" scripts/bench_kernels.py --sections kv_write --output "$out/kernels_kv_write_$tag.json"
step kernels_prefill 25 "$py" scripts/bench_kernels.py --sections prefill --output "$out/kernels_prefill_$tag.json"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 step decode_llama-3-8b 200 "$py" scripts/bench_decode.py --shape llama-3-8b \
    --batches 1,16,64 --repeats 1 --no-hf --output "$out/decode_llama-3-8b_$tag.json"
# Where decode time goes past the weights' read (Llama-3.2-1B shape, Ferry alone): decode iterations
# per dispatch (1 and 32 against the default 8), the multi-step loop recorded as a CUDA graph with
# its condition on the device (XLA's command buffers for WHILE/CONDITIONAL), XLA attention in place
# of the Pallas kernels.
for v in "k1 --decode-steps 1" "k32 --decode-steps 32" "xla_attention --attn-impl reference"; do
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 step "decode_variant_${v%% *}" 60 "$py" scripts/bench_decode.py \
        --shape llama-3.2-1b --batches 1,16 --repeats 2 --no-hf ${v#* } --output "$out/decode_variant_${v%% *}_$tag.json"
done
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 \
    step decode_variant_while_graphs 60 "$py" scripts/bench_decode.py --shape llama-3.2-1b --batches 1,16 \
    --repeats 2 --no-hf --output "$out/decode_variant_while_graphs_$tag.json"

"$py" scripts/gpu_summary.py "$out" 2>&1 | tee "$out/summary.txt"
pack_results
[ -z "$pack" ] || cp "$out/summary.txt" "$pack/summary.txt"
