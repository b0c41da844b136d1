#!/usr/bin/env bash
# Every GPU measurement the kernels work still owes, in one device call (no GPU has been lent yet).
#
#   bash scripts/gpu_checks.sh            # on the lent GPU, from the repository root
#
# Writes JSON (and a log) under $OUT (the device tool's folder; default benchmarks/results/) named
# after the GPU, e.g. kernels_nvidia_h100.json. Each benchmark checks its results against the
# references before timing them, so a kernel that compiles but computes wrongly shows ok=false.
# The device reaches no network: the repository runs from PYTHONPATH, and sampling uses synthetic
# logits at Llama-3's vocabulary (SmolLM2's weights are not installed there).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-benchmarks/results}
mkdir -p "$out"
tag=$(python -c "import jax; print(jax.devices()[0].device_kind.lower().replace(' ', '_'))" 2>/dev/null || echo unknown)
log="$out/gpu_checks_$tag.log"
run() { echo "== $*" | tee -a "$log"; timeout "${STEP_TIMEOUT:-420}" "$@" 2>&1 | tee -a "$log"; echo "rc=$?" | tee -a "$log"; }
python -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$log"
run python scripts/bench_kernels.py --output "$out/kernels_$tag.json"
run python scripts/bench_sampling.py --synthetic --vocab 128256 --batch 64 --output "$out/sampling_$tag.json"
