#!/usr/bin/env bash
# GPU verification in one go, for a machine with a CUDA device: the CUDA test
# suite first (correctness against the double reference), then the timings
# (bench_cuda_dense, the orchestrator on CUDA streams, llama_decode on the GPU).
#
#   scripts/gpu_check.sh [BIN_DIR] [STEPS]
#
# BIN_DIR is a build tree configured with HATTN_ENABLE_CUDA=ON (default
# build/); only its tests/, benchmarks/ and examples/ binaries are used, so a
# copy of those (plus BIN_DIR/lib for shared libraries the machine lacks) is
# enough. STEPS is a comma list of tests,dense,orch,sdpa,llama (default: all).
# Logs, JSON and traces go to one tarball, $OUT/gpu_check.tgz (OUT defaults to
# out/gpu). Every step runs even when an earlier one fails; the exit code is
# the number of failed steps.
set -u -o pipefail

bin=${1:-build}
steps=${2:-tests,dense,orch,sdpa,llama}
out=${OUT:-out/gpu}
raw=$out/raw  # everything lands here, then in one tarball: $out/gpu_check.tgz
mkdir -p "$raw"
[[ -d $bin/lib ]] && export LD_LIBRARY_PATH="$bin/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# cuBLAS from the toolkit or from the pip wheels, whichever the machine has.
if ! ldconfig -p | grep -q 'libcublas\.so\.13'; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia.cublas, os; print(os.path.dirname(nvidia.cublas.__file__) + "/lib")' 2>/dev/null); do
    [[ -e $d/libcublas.so.13 ]] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d" && break
  done
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$raw/gpu.txt"
failed=0
step() {  # step NAME LOG TIMEOUT_S CMD...
  local name=$1 log=$2 limit=$3
  shift 3
  case ",$steps," in *",$name,"*) ;; *) return 0 ;; esac
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$raw/$log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s ($log)"
  [[ $rc -ne 0 ]] && failed=$((failed + 1)) && tail -n 40 "$raw/$log"
  return 0
}

step tests tests_cuda.log 300 "$bin/tests/hattn_tests_cuda"
grep -E "test cases|worst" "$raw/tests_cuda.log" 2>/dev/null
step dense bench_cuda_dense.log 120 "$bin/benchmarks/bench_cuda_dense" \
  --benchmark_counters_tabular=true --benchmark_out="$raw/bench_cuda_dense.json"
grep -E "^cuda_" "$raw/bench_cuda_dense.log" 2>/dev/null
# The orchestrator on CUDA streams: stages as CUDA graphs (with the timeline
# recorded, one Chrome trace per case), then launched call by call.
step orch bench_orchestrator_cuda.log 150 env HATTN_BENCH_TRACE_DIR="$raw" \
  "$bin/benchmarks/bench_orchestrator" --benchmark_filter='orchestrator/cuda' \
  --benchmark_counters_tabular=true --benchmark_out="$raw/bench_orchestrator_cuda.json"
grep -E "^orchestrator" "$raw/bench_orchestrator_cuda.log" 2>/dev/null
step orch bench_orchestrator_cuda_nographs.log 150 env HATTN_BENCH_CUDA_GRAPHS=0 \
  "$bin/benchmarks/bench_orchestrator" --benchmark_filter='orchestrator/cuda' \
  --benchmark_counters_tabular=true
grep -E "^orchestrator" "$raw/bench_orchestrator_cuda_nographs.log" 2>/dev/null
# PyTorch SDPA on bench_cuda_dense's shapes.
step sdpa sdpa.log 240 python3 benchmarks/sdpa_reference.py --json "$raw/sdpa.json"
grep -E "best|torch" "$raw/sdpa.log" 2>/dev/null
# llama_decode, Llama-3-8B shape with 4 layers at a 32K prompt (synthetic
# weights and KV), batch 1 then batch 8: the whole model on the GPU, then GEMMs
# on the GPU with CPU attention (dense, then LSH) through the orchestrator.
# The synthetic weights (3.85 GB) go to /dev/shm: on the H100 machine's disk
# writing them did not finish in 300 s.
synth=/dev/shm/hattn-synthetic
mkdir -p "$synth" 2>/dev/null || synth=/tmp/hattn-synthetic
llama="$bin/examples/llama_decode --synthetic llama3-8b-shape-4layers --synthetic-dir $synth"
llama+=" --prompt-len 32768 --prefill synthetic --max-new-tokens 32 --compute cuda"
step llama llama_cuda.log 300 bash -c "set -e; $llama --attention cuda-dense
  $llama --attention cpu-dense --micro-batches 1
  $llama --attention lsh --micro-batches 1
  $llama --batch 8 --attention cuda-dense
  $llama --batch 8 --attention cpu-dense --micro-batches 2 --trace $raw/llama_cuda_cpu_dense_bs8.json
  $llama --batch 8 --attention lsh --micro-batches 2"
grep -E "^decode|^prefill|^memory|error" "$raw/llama_cuda.log" 2>/dev/null
echo "gpu_check: $failed step(s) failed"
tar -C "$raw" -czf "$out/gpu_check.tgz" . && rm -rf "$raw"
exit "$failed"
