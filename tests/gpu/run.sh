#!/usr/bin/env bash
# The one device check of the project, for a machine with an NVIDIA GPU (an H200 in practice) and
# PyTorch's CUDA LibTorch. Run from the repository root; writes everything under $OUT (default
# ./gpu-out): the logs, the benchmark JSON lines and summary.json, a table printed last.
#
#   tests/gpu/prepare_deps.sh        # here, once: Debian packages the device image may lack
#   tests/gpu/run.sh                 # there, with .gpudeps carried along
#
# Stages (each bounded by `timeout`, so the whole run stays inside 8 minutes):
#   1. what the machine has (GPU, compilers, MPI, the libraries mole needs) and what is used;
#   2. configure and build against the device's LibTorch, only the GPU targets, -j$(nproc);
#   3. the GPU tests: kernel tests (CUDA twins against the CPU references), the NCCL
#      communicator on one rank, a bf16 `mole train` on the GPU, and 2 ranks of expert
#      parallelism sharing the GPU through the MPI backend (host staging);
#   4. benchmarks: `mole bench kernels` (against the measured copy bandwidth) and
#      `mole bench train` for lora and mixlora at TinyLlama and LLaMA-2-7B shape, each next to
#      the Python peer (tests/gpu/peer_bench.py: HF PEFT LoRA, the `mixlora` package if present).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
START=$(date +%s)
JOBS=$(nproc)
RESULTS=$OUT/results.jsonl
: > "$RESULTS"
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[run.sh $(elapsed)s] $*"; }
# record NAME STATUS [DETAIL]: one line per check into results.jsonl.
record() {
  python3 - "$1" "$2" "${3:-}" >> "$RESULTS" <<'PY'
import json, sys
print(json.dumps({"check": sys.argv[1], "status": sys.argv[2], "detail": sys.argv[3]}))
PY
}
# Every stage ends by DEADLINE seconds after the start (the device call's budget is 8 minutes);
# a stage that would start later is recorded as skipped.
DEADLINE=${DEADLINE:-470}
# check NAME SECONDS CMD...: runs CMD with a time limit, its output into $OUT/NAME.log.
check() {
  local name=$1 limit=$2
  shift 2
  local left=$(( DEADLINE - $(elapsed) ))
  if [ $left -lt 15 ]; then
    record "$name" skipped "no time left"
    say "$name: skipped, no time left"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "$name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 5 "$OUT/$name.log"
  if [ $rc -eq 0 ]; then record "$name" pass; else record "$name" fail "exit $rc (log $name.log)"; fi
  return $rc
}

# ---- 1. the machine --------------------------------------------------------------------------
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  echo "nvcc: $(nvcc --version 2>&1 | tail -n 2 | tr '\n' ' ')"
  echo "c++: $(c++ --version 2>&1 | head -n 1)"
  echo "cmake: $(cmake --version 2>&1 | head -n 1)  ninja: $(ninja --version 2>&1)"
  echo "mpirun: $(mpirun --version 2>&1 | head -n 1)"
  python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  python3 -c 'import transformers, peft; print("transformers", transformers.__version__, "peft", peft.__version__)'
  python3 -c 'import mixlora; print("mixlora importable")' 2>&1 | tail -n 1
} 2>&1 | tee "$OUT/machine.txt"

# A library is taken from the image when its headers are there, else from the carried Debian
# packages (.gpudeps), unpacked into one prefix.
DEPS=/tmp/mole-deps
rm -rf "$DEPS" && mkdir -p "$DEPS"
have() { [ -e "$1" ] || compgen -G "$1" > /dev/null; }
use_carried() {  # use_carried LABEL PROBE DEB_PATTERN...
  local label=$1 probe=$2
  shift 2
  if have "$probe"; then
    echo "deps: $label from the image ($probe)"
    return
  fi
  local found=0
  for pattern in "$@"; do
    for deb in .gpudeps/$pattern*.deb; do
      [ -e "$deb" ] || continue
      dpkg-deb -x "$deb" "$DEPS" && found=1
    done
  done
  if [ $found = 1 ]; then echo "deps: $label carried ($*)"; else echo "deps: $label MISSING"; fi
}
{
  use_carried spdlog /usr/include/spdlog/spdlog.h libspdlog-dev_ libspdlog1.10_ libfmt-dev_ libfmt9_
  use_carried nlohmann-json /usr/include/nlohmann/json.hpp nlohmann-json3-dev_
  use_carried CLI11 /usr/include/CLI/CLI.hpp libcli11-dev_
  use_carried yaml-cpp /usr/include/yaml-cpp/yaml.h libyaml-cpp-dev_ libyaml-cpp0.7_
  use_carried googletest /usr/include/gtest/gtest.h libgtest-dev_
  use_carried protobuf "/usr/bin/protoc" libprotobuf-dev_ libprotobuf32_ protobuf-compiler_ libprotoc32_
  use_carried zlib /usr/include/zlib.h zlib1g-dev_
  have /usr/include/x86_64-linux-gnu/openmpi || have /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ||
    have /usr/include/mpi.h || echo "deps: MPI headers not found in the usual places (cmake's FindMPI decides)"
} 2>&1 | tee -a "$OUT/machine.txt"
export PATH=$DEPS/usr/bin:$PATH
export LD_LIBRARY_PATH=$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# ---- 2. build --------------------------------------------------------------------------------
TORCH_PREFIX=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
BUILD=$ROOT/build-gpu
check configure 150 cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  "-DCMAKE_PREFIX_PATH=$TORCH_PREFIX;$DEPS/usr" -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DMOLE_CUDA_KERNELS=ON -DMOLE_GLOO=OFF -DMOLE_NCCL=AUTO -DMOLE_FIXTURES="$ROOT/shared/fixtures"
check build 330 cmake --build "$BUILD" -j"$JOBS" --target mole mole_kernel_tests mole_dist_tests
BUILT=$?
say "build: exit $BUILT"

# ---- 3. GPU tests ----------------------------------------------------------------------------
MPIRUN="mpirun --oversubscribe"
[ "$(id -u)" = 0 ] && MPIRUN="$MPIRUN --allow-run-as-root"
if [ $BUILT = 0 ]; then
  check kernel_tests 120 "$BUILD/tests/mole_kernel_tests" --gtest_brief=1 \
    --gtest_output=json:"$OUT/kernel_tests.json"
  check nccl_np1 60 "$BUILD/tests/mole_dist_tests" --gtest_filter='*Nccl*:*NCCL*' --gtest_brief=1
  TRAIN_SET=(--set model.device=cuda --set model.dtype=bf16 --set train.steps=10 --set log.every=5
             --set train.micro_batch=4 --set train.global_batch=8 --set data.seq_len=256)
  check train_bf16 90 "$BUILD/mole" train --set adapter.method=mixlora --set log.dir="$OUT/run-bf16" \
    "${TRAIN_SET[@]}"
  check ep2_one_gpu_mpi 120 $MPIRUN -np 2 "$BUILD/mole" train --set adapter.method=mixlora \
    --set parallel.ep=2 --set parallel.backend=mpi --set log.dir="$OUT/run-ep2" "${TRAIN_SET[@]}"
fi

# ---- 4. benchmarks ---------------------------------------------------------------------------
BENCH=$OUT/bench.jsonl
: > "$BENCH"
bench() {  # bench NAME SECONDS CMD...: appends the command's JSON lines to bench.jsonl
  local name=$1
  check "$@" && grep -h '^{' "$OUT/$name.log" >> "$BENCH"
}
if [ $BUILT = 0 ]; then
  bench bench_kernels 60 "$BUILD/mole" bench kernels --device cuda --tokens 2048 --hidden 4096 \
    --intermediate 11008 --experts 8 --top-k 2 --r 16 --warmup 3 --iters 20 --json
fi
for shape in tinyllama llama-2-7b; do
  for method in lora mixlora; do
    [ $BUILT = 0 ] && bench "mole_${method}_${shape}" 90 "$BUILD/mole" bench train --device cuda \
      --shape "$shape" --method "$method" --batch 4 --seq 512 --experts 8 --top-k 2 --r 16 \
      --warmup 3 --iters 10 --json
  done
  bench "peer_${shape}" 150 python3 tests/gpu/peer_bench.py --shape "$shape" --batch 4 --seq 512 \
    --experts 8 --top-k 2 --r 16 --warmup 3 --steps 10
done

# ---- summary ---------------------------------------------------------------------------------
python3 tests/gpu/summarize.py "$RESULTS" "$BENCH" "$OUT/summary.json" "$(elapsed)"
