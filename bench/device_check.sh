#!/usr/bin/env bash
# The first thing to run on a GPU machine (issue 19's "ready for the first GPU"), in one call of
# at most 8 minutes, build included:
#   1. env           date, GPU, versions, CPU (python -m bench.device_check env)
#   2. build         the extension in place, CUDA kernels for the visible GPU's architecture only
#                    (one architecture builds about twice as fast as the default two), MAX_JOBS
#                    = the machine's cores
#   3. bench         python -m bench at 64M and 256M fp32 params, both shapes, fp32 and bf16
#                    optimizer state, against AdamW(fused=True) (and ivon-opt if its wheel came
#                    along), and the host cost over 30 to 3000 tensors; it writes what it
#                    measured when its timeout stops it
#   4. e2e           python -m bench.e2e: the GPT-2 125M training step, AdamW against IVON's
#                    drop-in and official loops
#   5. trajectories  tests/test_backend_trajectories.py: no mark, but on a GPU its Triton and
#                    CUDA cases train there
#   6. gpu_tests     pytest -m "gpu or triton": the GPU-marked tests and the Triton tests (with a
#                    GPU they run on it, not under the interpreter); last, as they may take all
#                    the time that is left
#   7. the table     the figures, then each step's outcome (failed, timed out, skipped)
# Each step's timeout comes from what is left of the budget (--budget, default 450 s) minus what
# the later steps need at least; a step that fails does not stop the later ones.
#
# From the device tool (the GPU machine has no network: wheels travel in .whl/):
#     pip download --no-deps -d .whl ivon-opt==0.1.3        # once, here; optional
#     run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
# Results: $OUT (the device tool's folder, which takes back at most 8 files) or a new temporary
# folder, never the working tree: summary.txt, bench_gpu.json, e2e.json and logs.tar.gz (every
# step's log and the plots). The end of the output says where to record them.
#
#     bash bench/device_check.sh --dry-run
# runs on a CPU (tests/test_device_check.py, in CI): everything that needs no GPU for real (the
# arguments, the wheels, the environment, the timeouts, the table), each GPU step's command printed
# instead of run, then checked in a quick CPU form: python -m bench and bench.e2e with the same
# flags and CPU overrides after them (argparse keeps the last), pytest collecting what the GPU
# step would run. It never builds.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
    echo "usage: bash bench/device_check.sh [--dry-run] [--budget SECONDS]"
    echo "  env: OUT (results folder), WHEEL_DIR (default .whl), TEST_WORKERS (pytest-xdist, 8),"
    echo "       PYTHON (default python3), MAX_JOBS (default: the cores)"
}

DRY=0
BUDGET=${BUDGET:-450}
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --budget) BUDGET=${2:-}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if ! [[ $BUDGET =~ ^[0-9]+$ ]]; then
    echo "--budget takes whole seconds, got '$BUDGET'" >&2
    exit 2
fi

DIR=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/ivon_device_check.XXXXXX")}
LOGS=$DIR/logs
STEPS=$LOGS/steps.tsv
mkdir -p "$LOGS" && : > "$STEPS" || exit 2
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}   # the GPU machine's python3 holds torch; a test passes its own

# Seconds for a step: what it wants, less where the later steps would keep under RESERVE.
slot() {
    local want=$1 left=$((BUDGET - SECONDS - $2))
    [ "$left" -lt "$want" ] && want=$left
    echo "$want"
}

# A command as it would be typed (single quotes where a word needs them).
quote() {
    local word line=""
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
            line+="$word "
        else
            line+="'${word//\'/\'\\\'\'}' "
        fi
    done
    echo "${line% }"
}

# One row of the closing table: name, status, rc, seconds, limit, log, the log's last line.
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STEPS"
}

last_line() {
    grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | tr '\t' ' ' | cut -c1-200
}

# Run a command under its timeout into LOGS/NAME.log; a failure shows the log's end at once.
run_logged() {
    local name=$1 limit=$2 log=$LOGS/$1.log start=$SECONDS rc status
    shift 2
    if [ "$limit" -lt 5 ]; then
        echo "  SKIPPED: no time left (${limit} s)"
        record "$name" SKIPPED - 0 "$limit" - "no time left in the budget"
        return 1
    fi
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMED OUT" ;;
        *) status=FAILED ;;
    esac
    record "$name" "$status" "$rc" "$((SECONDS - start))" "$limit" "$name.log" "$(last_line "$log")"
    echo "  $status (rc $rc) in $((SECONDS - start)) s of $limit"
    [ "$rc" -eq 0 ] || tail -n 15 "$log" | sed 's/^/  | /'
    return "$rc"
}

# step NAME WANT RESERVE CMD...: a step that needs no GPU, run in both modes.
step() {
    local name=$1 limit
    limit=$(slot "$2" "$3")
    shift 3
    echo "+ $name: $(quote "$@")"
    run_logged "$name" "$limit" "$@"
}

# gpu_step NAME WANT RESERVE CMD...: run it, or in a dry run print it only.
gpu_step() {
    if [ "$DRY" = 0 ]; then
        step "$@"
        return
    fi
    local name=$1 limit
    limit=$(slot "$2" "$3")
    shift 3
    echo "+ $name: $(quote "$@")"
    record "$name" printed - 0 "$limit" - "not run: dry run"
}

# dry_check NAME WANT CMD...: in a dry run, the GPU step NAME's quick CPU form; on one thread,
# as torch's OpenMP threads wait long on a busy machine's cores (CI's is shared)
dry_check() {
    [ "$DRY" = 1 ] || return 0
    local name=check_$1 want=$2
    shift 2
    step "$name" "$want" 0 env OMP_NUM_THREADS=1 "$@"
}

has_module() {
    "$PY" -c "import $1" > /dev/null 2>&1
}

# The visible GPU's compute capability, e.g. 9.0 (H100, H200); 9.0 where none is visible (a dry
# run), as the device tool lends Hopper cards.
gpu_arch() {
    local cap=""
    if command -v nvidia-smi > /dev/null; then
        cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
            | head -n 1 | tr -d ' ')
        [[ $cap =~ ^[0-9]+\.[0-9]+$ ]] || cap=$("$PY" -c \
            "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    fi
    echo "${cap:-9.0}"
}

# Pure-Python wheels (the GPU machine has no network): into /tmp/site, or in a dry run into a
# folder of the logs that the packing removes.
install_wheels() {
    local wheels=${WHEEL_DIR:-.whl} target=/tmp/site
    [ "$DRY" = 1 ] && target=$LOGS/site
    if ! compgen -G "$wheels/*.whl" > /dev/null; then
        echo "== wheels: none in $wheels/ (ivon-opt's rows need its wheel there)"
        return 0
    fi
    echo "== wheels: $(cd "$wheels" && echo *.whl) -> $target"
    step wheels 60 300 "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$target" "$wheels"/*.whl \
        && export PYTHONPATH=$target${PYTHONPATH:+:$PYTHONPATH}
}

# The GPU's short name for the record's file names: h100, h200; cpu without one.
card() {
    local name
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    name=$(echo "${name:-cpu}" | tr 'A-Z' 'a-z' | sed 's/^nvidia //; s/ .*//')
    echo "${name:-gpu}"
}

# The table last; then the results into DIR: at most 8 files, as the device tool takes back.
finish() {
    local rc day gpu
    echo
    echo "== table (total $SECONDS s of the budget's $BUDGET s)"
    "$PY" -m bench.device_check table "$STEPS" --bench "$LOGS/bench_gpu.json" \
        --e2e "$LOGS/e2e.json" 2>&1 | tee "$DIR/summary.txt"
    rc=${PIPESTATUS[0]}
    for file in bench_gpu.json e2e.json; do
        [ -f "$LOGS/$file" ] && cp "$LOGS/$file" "$DIR/$file"
    done
    rm -rf "$LOGS/site"
    tar czf "$DIR/logs.tar.gz" -C "$DIR" logs && rm -rf "$LOGS"
    day=$(date -u +%F)
    gpu=$(card)
    echo "# results in $DIR: $(cd "$DIR" && echo *)"
    echo "# (from the device tool: the files_at folder of its reply)"
    echo "# record them with the card and date, and compare them with issue 19's estimates:"
    echo "#   bench/results/bench_${day}_$gpu.json, e2e_${day}_gpt2-125m_$gpu.json,"
    echo "#   device_check_${day}_$gpu.txt (summary.txt) and a note ${day}-$gpu.md"
    return "$rc"
}

echo "== device check$([ "$DRY" = 1 ] && echo ", dry run: GPU steps printed, not run"):" \
    "budget $BUDGET s, results in $DIR"
install_wheels
step env 60 0 "$PY" -m bench.device_check env && cat "$LOGS/env.log"

arch=$(gpu_arch)
echo "== build (TORCH_CUDA_ARCH_LIST=$arch: the visible GPU's architecture)"
gpu_step build 240 200 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    IVON_FAST_FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index \
    -v -e .
built=$?
# with the CUDA kernels built, a test that finds them missing must fail, not skip
cuda_env=()
[ "$built" -eq 0 ] && cuda_env=(IVON_FAST_EXPECT_CUDA=1)

# fp32 params only (the targets' case): bf16 params would double the bench's time
echo "== bench (64M and 256M fp32 params, fp32 and bf16 state)"
bench=("$PY" -m bench --device cuda --sizes 64M,256M --dtype float32
    --shapes few-large,gpt2 --state-dtypes float32,bfloat16 --out "$LOGS"
    --json "$LOGS/bench_gpu.json")
gpu_step bench 180 150 "${bench[@]}"
dry_check bench 120 "${bench[@]}" --device cpu --sizes 64K --dtype float32 --shapes few-large \
    --rounds 1 --copy-size 64K --host-tensors 30 --host-rounds 1 --no-floor --no-ivon-opt \
    --no-foreach --retries 0

echo "== e2e (GPT-2 125M training step)"
e2e=("$PY" -m bench.e2e --device cuda --config gpt2-125m --steps 30 --json "$LOGS/e2e.json"
    --quiet)
gpu_step e2e 120 90 "${e2e[@]}"
dry_check e2e 120 "${e2e[@]}" --device cpu --config tiny --steps 1 --warmup 0 --batch 2 --pool 1

echo "== GPU tests"
# xdist spreads Triton's compiling over the cores (not in the dry run's checks: its workers
# would each collect again); pytest-timeout stops a hung test alone
workers=()
has_module xdist && [ "${TEST_WORKERS:-8}" != 0 ] && workers=(-n "${TEST_WORKERS:-8}")
pytest_flags=(-p no:cacheprovider -rfE --tb=short)
trajectories=tests/test_backend_trajectories.py
gpu_step trajectories 60 80 env "${cuda_env[@]}" "$PY" -m pytest -q "${pytest_flags[@]}" \
    "${workers[@]}" "$trajectories"
dry_check trajectories 10 test -f "$trajectories"
gpu_tests=(-v -m "gpu or triton" "${pytest_flags[@]}" --continue-on-collection-errors)
has_module pytest_timeout && gpu_tests+=(--timeout 180)
gpu_step gpu_tests 600 10 env "${cuda_env[@]}" "$PY" -m pytest "${gpu_tests[@]}" \
    "${workers[@]}" tests
dry_check gpu_tests 120 "$PY" -m pytest "${gpu_tests[@]}" --collect-only tests

finish
