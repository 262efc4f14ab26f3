#!/usr/bin/env bash
# One-shot GPU check, for a machine with a CUDA GPU and a CUDA torch: build the CUDA kernels, run every
# GPU test, time the ops on the GPU against eager torch and the peers, time one PPO step, and run the
# three-step pipeline on the GPU. Each stage has its own time limit and log; a failed stage does not stop
# the next one. Results go to $OUT (or ./gpu_check_out): summary.txt names each stage's exit code and time;
# build.log, tests.log, precision.log, bench.log, ppo_step.log and pipeline.log hold the output, with
# precision.csv, bench.csv and ppo_step.csv (at most 8 files come back from a lease: pick the stages).
#
#   bench/gpu_check.sh                      # every stage: env build tests errors precision profile
#                                           # bench ppo_step pipeline
#   bench/gpu_check.sh build tests          # some stages, in the order given
#
# A 15-minute lease fits two calls back to back (the second finds the build in place). On an H200: env
# 29 s, build 73 s (16 jobs), tests 88 s, profile 20 s, ppo_step 97 s, pipeline 134 s; bench_models and
# bench_advantages ran out their limits (150 s, 100 s: now 180 s, 130 s). A lease's start took ~40 s.
#   bench/gpu_check.sh env build tests errors profile               # ~4.5 minutes
#   bench/gpu_check.sh bench_models bench_advantages ppo_step       # at most 7.7 minutes, the limits' sum
#
# Wheels of missing packages (bitsandbytes, the peers) may sit in ./.whl: they are installed first, into
# a scratch directory put on PYTHONPATH, since such a machine may have no package index.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export RESULTS=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$RESULTS"
export PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
echo "gpu_check at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
  | tee "$RESULTS/summary.txt"
export FASTRLHF_HOME=${FASTRLHF_HOME:-$(mktemp -d)}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
    || echo "gpu_check: installing the carried wheels failed" | tee -a "$RESULTS/summary.txt"
  export PYTHONPATH=$site
fi
# The source tree, with the extension built in place, is the package under test.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# stage NAME LIMIT_S LOG: runs the function NAME in a child shell under a time limit, appends its output
# to LOG.log (few files: a lease may bring back only a handful) and records the exit code and the time.
stage() {
  local name=$1 limit=$2 log="$RESULTS/$3.log" start=$SECONDS rc
  echo "=== $name" >>"$log"
  timeout -k 10 "$limit" bash -c "set -o pipefail; $(declare -f "$name"); $name" >>"$log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$RESULTS/summary.txt"
  tail -n 4 "$log" | sed "s/^/  $name| /"
  return 0
}

env_report() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  "$PYTHON" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("triton", "transformers", "bitsandbytes", "liger_kernel", "trl", "peft", "accelerate"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:  # a missing peer is reported, not fatal
        print(name, "unavailable:", type(exc).__name__, exc)
PY
  nvcc --version | tail -n 2
  "${CXX:-c++}" --version | head -n 1
  lscpu | grep -E "Model name|^CPU\(s\)"
}

build() {
  # sm_90 only: this is the card under test, and one architecture halves nvcc's time. MAX_JOBS compiler
  # processes at once (setup.py): built one source at a time, the build outran 300 s on an H200 machine.
  MAX_JOBS=${MAX_JOBS:-16} FASTRLHF_CUDA_ARCHS=${FASTRLHF_CUDA_ARCHS:-90} "$PYTHON" setup.py build_ext --inplace
  "$PYTHON" -c "from fastrlhf.ops import available_backends as a; [print(n, i) for n, i in a().items()]"
}

gpu_tests() {
  # Every test file with GPU cases (op_targets / gpu_backends params, or a cuda case), plus the check
  # that a CUDA machine has the cuda backend. pytest-xdist, where installed, spreads them over workers:
  # most of the time is Triton's JIT and the float64 references on the CPU, not the GPU.
  local workers=()
  if "$PYTHON" -c "import xdist" 2>/dev/null; then
    workers=(-n "${GPU_CHECK_TEST_WORKERS:-8}")
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  fi
  FASTRLHF_FATAL_SIGNAL_TRACES=1 FASTRLHF_REQUIRE=cpp,triton,cuda "$PYTHON" -m pytest -q -p no:cacheprovider -rfE "${workers[@]}" \
    tests/test_required_backends.py tests/test_backends.py tests/test_compile.py tests/test_ops_fuzz.py \
    tests/test_gather_logprobs.py tests/test_linear_logprobs.py tests/test_group_advantages.py \
    tests/test_policy_loss.py tests/test_compiled_ops.py tests/test_kl_penalty.py tests/test_gae.py \
    tests/test_ranking_loss.py tests/test_sample.py tests/test_reliability.py \
    -k "${GPU_CHECK_TESTS_K:-gpu or cuda or required}"
}

error_paths() {
  # Bad-input calls of the compiled ops by each route (the wrapper, fastrlhf._C's typed entry, torch.ops),
  # each in its own process: a shape error crashed the cuda backend's gather_logprobs on an H200, and the
  # route that crashes, with the C++ frames of the crash, says where.
  "$PYTHON" bench/error_paths.py --cases "${GPU_CHECK_ERROR_CASES:-gather_labels_shape,kl_ref_shape,ranking_no_pairs}"
}

precision() {
  # gather_logprobs' errors against float64 on the large shapes, per backend, next to torch's own.
  "$PYTHON" bench/precision.py --device cuda --sizes "${GPU_CHECK_PRECISION_SIZES:-4096x32000,1x151936}" \
    --dtypes fp32,bf16 --csv "$RESULTS/precision.csv"
}

# The benches leave out the torch.compile baselines (their compile time would eat the lease) and the
# peak-memory column (one fresh process per case: ~20 s each with CUDA's start-up, seen on an H200).
# Sizes: each op's call-overhead case and one or two GPU-sized cases (every GPU case of every op takes
# longer than a lease); GPU_CHECK_SIZES overrides the list (';'-separated size labels, as printed).
GPU_CHECK_SIZES_DEFAULT="N=2,V=8;N=8192,V=32000;N=2,H=8,V=16;N=4096,H=4096,V=32000"
GPU_CHECK_SIZES_DEFAULT+=";B=2,T=8;B=256,T=2048;B=256,T=8192;B=256,T=8192,frozen-ref,token-mean"
GPU_CHECK_SIZES_DEFAULT+=";grpo: B=2,k=2,T=8;grpo: B=512,k=8,T=1024;N=2,K=3;N=8192,K=9"
GPU_CHECK_SIZES_DEFAULT+=";B=2,V=16;B=256,V=128256"
export GPU_CHECK_SIZES=${GPU_CHECK_SIZES:-$GPU_CHECK_SIZES_DEFAULT}

bench_models() {
  # The logprob and fused-loss ops against eager, the read-once floor, TRL and Liger.
  "$PYTHON" bench/run.py --device cuda --ops "${GPU_CHECK_MODEL_OPS:-gather_logprobs,linear_logprobs,ppo_policy_loss}" \
    --sizes "$GPU_CHECK_SIZES" --modes fwd,full --providers eager,read-once,trl,liger,fastrlhf --no-memory \
    --csv "$RESULTS/bench.csv" --plots-dir "$(mktemp -d)"
}

bench_advantages() {
  "$PYTHON" bench/run.py --device cuda \
    --ops kl_penalty,ranking_loss,gae,compute_advantages,group_advantages,ppo_logprob_loss,sample \
    --sizes "$GPU_CHECK_SIZES" --modes fwd,full --providers eager,verl,transformers,fastrlhf --no-memory \
    --csv "$RESULTS/bench.csv" --plots-dir "$(mktemp -d)"
}

profile() {
  # Host against device time per call for the ops that lost to eager torch on an H200 (Triton KL and
  # ranking) and the logprob gather: which side a slow call spends its time on.
  "$PYTHON" bench/gpu_profile.py --calls "${GPU_CHECK_PROFILE_CALLS:-50}"
}

ppo_step() {
  # A ~0.5B-parameter Llama (vocabulary 151936, hidden 896, 24 layers: 490M parameters) built from a
  # config, the trainer's dtypes (fp32 for the trained policy and critic and the reference, bf16 for the
  # scoring reward model), SDPA (flash-attn for half-precision weights when it imports), bitsandbytes'
  # 8-bit AdamW; the four models of the paper (separate mode), fused ops against the torch backend.
  "$PYTHON" bench/ppo_step.py --modes "${GPU_CHECK_PPO_MODES:-separate}" --backends fused,torch --steps 2 \
    --vocab 151936 --hidden 896 --layers 24 --optimizer adamw8bit --no-memory --timeout 120 \
    --csv "$RESULTS/ppo_step.csv" --plot "$(mktemp -d)/ppo_step.png"
}

pipeline() {
  # Without the PPO-ptx comparison run: the GPU's time goes to the other checks. The summary table is
  # printed last, so the log holds it.
  "$PYTHON" -m fastrlhf pipeline --no_compare_ptx --output "$FASTRLHF_HOME/pipeline"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(env build tests errors precision profile bench ppo_step pipeline)
for name in "${stages[@]}"; do
  case $name in
    env) stage env_report 60 build ;;
    build) stage build 240 build ;;
    tests) stage gpu_tests 120 tests ;;
    errors) stage error_paths 60 tests ;;
    precision) stage precision 90 precision ;;
    bench) stage bench_models 180 bench && stage bench_advantages 130 bench ;;
    bench_models) stage bench_models 180 bench ;;
    bench_advantages) stage bench_advantages 130 bench ;;
    profile) stage profile 90 bench ;;
    ppo_step) stage ppo_step 150 ppo_step ;;
    pipeline) stage pipeline 150 pipeline ;;
    *) echo "gpu_check: unknown stage '$name' (env build tests errors precision profile bench bench_models bench_advantages ppo_step pipeline)" >&2; exit 2 ;;
  esac
done
