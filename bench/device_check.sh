#!/usr/bin/env bash
# One call on a GPU machine: build the extension in place, benchmark the backends against
# torch.optim.AdamW(fused=True), AdamW(foreach=True) and ivon-opt (`python -m bench`, fp32 and
# bf16, both model shapes, 1M to 256M; the drop-in step with and without the finite check, and
# with bf16 optimizer state (--state-dtypes float32,bfloat16: a row per backend, and the target
# lines: the drop-in step with bf16 state <= 0.95x fused AdamW at >= 64M fp32 params, state bytes
# equal to AdamW's); first its host-cost section: one step() over 30, 300 and 3000 one-element
# tensors; rows measured on a busy machine are measured again and marked),
# run the GPU tests, run the CPU benchmark on the machine's cores in quick form, sweep the Triton
# launch configuration if time is left, and print a short table (with the target lines) last.
# The whole run keeps to a budget of 470 s (BUDGET=...): every step gets a timeout
# from what is left, and `python -m bench` writes what it measured when its timeout stops it.
# From the device tool:
#     run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
# where .whl/ holds pure-Python wheels (the GPU machine has no network):
#     pip download --no-deps -d .whl ivon-opt==0.1.3 tqdm
# (matplotlib, for the PNG plots, is rarely there; without it the JSON is written and the plots can
# be drawn anywhere later: python -m bench.report --plot --out DIR .device_out/*.json)
# Logs, JSON and plots go to $OUT (the device tool's folder) or /tmp/ivon_device_check.
# `bash bench/device_check.sh quick`: build, the extension's GPU tests, one 64M fp32 benchmark
# (fp32 and bf16 state).
set -uo pipefail
MODE=${1:-full}
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ivon_device_check}
BUDGET=${BUDGET:-470}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# seconds for a step: min(want, what is left of the budget minus what the later steps need)
slot() {
    local want=$1 reserve=$2 left=$((BUDGET - SECONDS - $2))
    [ "$left" -lt "$want" ] && want=$left
    [ "$want" -lt 1 ] && want=1
    echo "$want"
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
} 2>&1 | tee "$OUT/env.txt"

echo "== build"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} IVON_FAST_FORCE_CUDA=1
if [ -z "${CUDA_HOME:-}" ]; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
fi
start=$SECONDS
timeout "$(slot 240 200)" python3 -m pip install --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1
build_rc=$?
echo "build rc=$build_rc in $((SECONDS - start)) s" | tee "$OUT/summary.txt"
[ "$build_rc" -eq 0 ] || tail -40 "$OUT/build.log"

if [ "$MODE" = quick ]; then
    timeout "$(slot 120 30)" python3 -m pytest -q -m "gpu and cpp" tests/test_kernels.py \
        tests/test_kernels_state.py tests/test_kernels_builds.py \
        tests/test_backend_trajectories.py -p no:cacheprovider --maxfail=30 \
        > "$OUT/gpu_tests.log" 2>&1
    echo "gpu tests rc=$?: $(tail -1 "$OUT/gpu_tests.log")" | tee -a "$OUT/summary.txt"
    timeout "$(slot 90 5)" python3 -m bench --sizes 64M --dtype float32 --shapes few-large \
        --state-dtypes float32,bfloat16 --no-ivon-opt --rounds 10 --out "$OUT" \
        --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.txt" 2>&1
    echo "benchmark rc=$?" | tee -a "$OUT/summary.txt"
    cat "$OUT/summary.txt" "$OUT/bench_gpu.txt"
    exit 0
fi

echo "== benchmark (GPU: fp32 and bf16 params and state, few-large and gpt2 shapes, 1M to 256M)"
start=$SECONDS
timeout "$(slot 200 150)" python3 -m bench --sizes 1M,16M,64M,256M --rounds 15 \
    --state-dtypes float32,bfloat16 --out "$OUT" --json "$OUT/bench_gpu.json" \
    > "$OUT/bench_gpu.txt" 2>&1
echo "gpu benchmark rc=$? in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
grep -E "^# (note|results|plot|target)" "$OUT/bench_gpu.txt"

echo "== GPU tests"
start=$SECONDS
timeout "$(slot 240 75)" python3 -m pytest -q -m gpu tests -p no:cacheprovider --maxfail=30 \
    > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? in $((SECONDS - start)) s: $(tail -1 "$OUT/gpu_tests.log")" \
    | tee -a "$OUT/summary.txt"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20

echo "== benchmark (CPU, $(nproc) cores, quick form)"
start=$SECONDS
timeout "$(slot 60 15)" python3 -m bench --device cpu --quick --sizes 1M,16M --dtype float32 \
    --out "$OUT" --json "$OUT/bench_cpu.json" > "$OUT/bench_cpu.txt" 2>&1
echo "cpu benchmark rc=$? in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"

if [ $((BUDGET - SECONDS)) -gt 60 ]; then
    echo "== Triton launch sweep (64M fp32, drop-in step without the finite check: the kernel)"
    timeout "$(slot 100 10)" python3 - > "$OUT/triton_sweep.txt" 2>&1 <<'EOF'
import os
import torch
from bench.__main__ import bench_adamw, bench_ivon_fast, bytes_per_element

numel, device, mode = 64_000_000, torch.device("cuda"), "drop_in_step_unchecked"
adamw = bench_adamw(numel, 4, device, torch.float32, 20)
print(f"AdamW(fused=True) {adamw * 1e3:.3f} ms")
for block in (1024, 2048, 4096):
    for warps in (4, 8, 16):
        os.environ["IVON_TRITON_BLOCK"], os.environ["IVON_TRITON_WARPS"] = str(block), str(warps)
        seconds = bench_ivon_fast(numel, 4, device, torch.float32, 20, "triton", mode)
        print(f"BLOCK={block:5d} warps={warps:2d}  {seconds * 1e3:.3f} ms  "
              f"{bytes_per_element(mode, 4) * numel / seconds / 1e9:6.0f} GB/s  "
              f"x AdamW {seconds / adamw:.3f}", flush=True)
EOF
else
    echo "(no time left for the Triton launch sweep)" > "$OUT/triton_sweep.txt"
fi

echo "== results (total $SECONDS s)"
cat "$OUT/summary.txt" "$OUT/triton_sweep.txt"
grep -h "^# note" "$OUT/bench_gpu.txt" "$OUT/bench_cpu.txt" 2>/dev/null
jsons=$(ls "$OUT"/bench_gpu.json "$OUT"/bench_cpu.json 2>/dev/null)
if [ -n "$jsons" ]; then
    python3 -m bench.report --host $jsons
else
    tail -30 "$OUT/bench_gpu.txt"
fi
