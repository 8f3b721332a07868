#!/usr/bin/env bash
# The one device check of the project, for a machine with an NVIDIA GPU (an H200 in practice) and
# PyTorch's CUDA LibTorch. Run from the repository root; writes everything under $OUT (default
# ./gpu-out): the logs, the benchmark JSON lines and summary.json, a table printed last.
#
#   tests/gpu/prepare_deps.sh        # on Debian 12, once: packages the GPU image may lack
#   tests/gpu/run.sh                 # on the GPU machine, with .gpudeps copied along
#
# Stages, most important first, each bounded by `timeout` and all by DEADLINE (default 540 s:
# give the job a time limit of about 580 s):
#   1. what the machine has (GPU, compilers, MPI, the libraries mole needs) and what is used;
#   2. configure and build against the device's LibTorch, only the GPU targets, -j$(nproc);
#   3. kernel tests (the CUDA twins against the CPU references) and a bf16 `mole train` on the
#      GPU (MixLoRA, then plain LoRA);
#   4. benchmarks: `mole bench kernels` (against the measured copy bandwidth), then
#      `mole bench train` for lora and mixlora next to the Python peer (tests/gpu/peer_bench.py:
#      HF PEFT LoRA, the `mixlora` package if present) at LLaMA-2-7B shape, then TinyLlama;
#   5. the NCCL communicator on one rank, and 2 ranks of expert parallelism sharing the GPU
#      through the MPI backend (host staging).
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
# The Python that holds PyTorch (a virtual environment on the device image), first on PATH.
PY=python3
for candidate in /opt/torch/.venv/bin/python3 "$(command -v python3 2>/dev/null)"; do
  if [ -x "$candidate" ] && "$candidate" -c 'import torch' 2>/dev/null; then PY=$candidate; break; fi
done
export PATH=$(dirname "$PY"):$PATH

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[run.sh $(elapsed)s] $*"; }
# record NAME STATUS [DETAIL]: one line per check into results.jsonl.
record() {
  "$PY" - "$1" "$2" "${3:-}" >> "$RESULTS" <<'PY'
import json, sys
print(json.dumps({"check": sys.argv[1], "status": sys.argv[2], "detail": sys.argv[3]}))
PY
}
# Every stage ends by DEADLINE seconds after the start; a stage that would start later is
# recorded as skipped.
DEADLINE=${DEADLINE:-540}
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
  if [ $rc -ne 0 ]; then
    record "$name" fail "exit $rc (log $name.log)"
  elif grep -q '^\[  PASSED  \] 0 tests' "$OUT/$name.log"; then
    record "$name" skipped "no test ran: every one was skipped or none was built (log $name.log)"
  else
    record "$name" pass "$(grep -o '^\[  SKIPPED \] [0-9]* tests\?' "$OUT/$name.log" | head -n 1)"
  fi
  return $rc
}

# ---- 1. the machine --------------------------------------------------------------------------
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  echo "nvcc: $(nvcc --version 2>&1 | tail -n 2 | tr '\n' ' ')"
  echo "c++: $(c++ --version 2>&1 | head -n 1)"
  echo "cmake: $(cmake --version 2>&1 | head -n 1)  ninja: $(ninja --version 2>&1)"
  echo "mpirun: $(mpirun --version 2>&1 | head -n 1)"
  echo "python: $PY"
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  "$PY" -c 'import transformers, peft; print("transformers", transformers.__version__, "peft", peft.__version__)'
  "$PY" -c 'import mixlora; print("mixlora importable")' 2>&1 | tail -n 1
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
  # protoc and the headers must match: both from the image or both carried.
  if have /usr/bin/protoc && have /usr/include/google/protobuf/message.h; then
    use_carried protobuf /usr/include/google/protobuf/message.h
  else
    use_carried protobuf /nonexistent libprotobuf-dev_ libprotobuf32_ protobuf-compiler_ libprotoc32_
  fi
  use_carried zlib /usr/include/zlib.h zlib1g-dev_
  have /usr/include/x86_64-linux-gnu/openmpi || have /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ||
    have /usr/include/mpi.h || echo "deps: MPI headers not found in the usual places (cmake's FindMPI decides)"
} 2>&1 | tee -a "$OUT/machine.txt"
# Debian's libz.so is an absolute link to its own libz.so.1.x: point it at the image's libz.so.1.
if [ -L "$DEPS/usr/lib/x86_64-linux-gnu/libz.so" ] && [ ! -e "$DEPS/usr/lib/x86_64-linux-gnu/libz.so" ]; then
  for z in /lib/x86_64-linux-gnu/libz.so.1 /usr/lib/x86_64-linux-gnu/libz.so.1; do
    [ -e "$z" ] && ln -sf "$z" "$DEPS/usr/lib/x86_64-linux-gnu/libz.so" && break
  done
fi
export PATH=$DEPS/usr/bin:$PATH
export LD_LIBRARY_PATH=$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# ---- 2. build --------------------------------------------------------------------------------
# MOLE_GPU_BUILD=DIR reuses a folder that is already built (a dry run of the stages elsewhere).
if [ -n "${MOLE_GPU_BUILD:-}" ]; then
  BUILD=$MOLE_GPU_BUILD
  say "build: reusing $BUILD"
  BUILT=0
else
  TORCH_PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  # NCCL from PyTorch's own wheel (nvidia-nccl): headers and libnccl.so.2 under its package folder.
  NCCL_ARGS=()
  NCCL_DIR=$("$PY" -c 'import nvidia.nccl as n; print(list(n.__path__)[0])' 2>/dev/null)
  if [ -n "$NCCL_DIR" ] && [ -e "$NCCL_DIR/include/nccl.h" ]; then
    NCCL_LIB=$(ls "$NCCL_DIR"/lib/libnccl.so* 2>/dev/null | head -n 1)
    [ -n "$NCCL_LIB" ] && NCCL_ARGS=("-DMOLE_NCCL_INCLUDE_DIR=$NCCL_DIR/include" "-DMOLE_NCCL_LIBRARY=$NCCL_LIB")
  fi
  echo "nccl: ${NCCL_ARGS[*]:-not found in the torch wheel; CMake searches the CUDA toolkit}" | tee -a "$OUT/machine.txt"
  BUILD=$ROOT/build-gpu
  check configure 150 cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    "-DCMAKE_PREFIX_PATH=$TORCH_PREFIX;$DEPS/usr" -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DPython3_EXECUTABLE="$PY" -DMOLE_CUDA_KERNELS=ON -DMOLE_GLOO=OFF "${NCCL_ARGS[@]}" \
    -DMOLE_FIXTURES="$ROOT/shared/fixtures"
  check build 330 cmake --build "$BUILD" -j"$JOBS" --target mole mole_kernel_tests mole_dist_tests
  BUILT=$?
fi
say "build: exit $BUILT"
[ $BUILT = 0 ] || say "build failed: the mole stages are skipped; the peer benchmarks still run"

MPIRUN="mpirun --oversubscribe"
[ "$(id -u)" = 0 ] && MPIRUN="$MPIRUN --allow-run-as-root"
TRAIN_SET=(--set model.device=cuda --set model.dtype=bf16 --set train.steps=4 --set log.every=2
           --set train.micro_batch=4 --set train.global_batch=8 --set data.seq_len=256)
BENCH=$OUT/bench.jsonl
: > "$BENCH"
bench() {  # bench NAME SECONDS CMD...: appends the command's JSON lines to bench.jsonl
  local name=$1
  check "$@"
  local rc=$?
  grep -h '^{' "$OUT/$name.log" >> "$BENCH" 2>/dev/null
  return $rc
}
mole_bench() {  # mole_bench SHAPE METHOD
  [ $BUILT = 0 ] && bench "mole_$2_$1" 90 "$BUILD/mole" bench train --device cuda --shape "$1" \
    --method "$2" --batch 4 --seq 512 --experts 8 --top-k 2 --r 16 --warmup 2 --iters 6 --json
}

# ---- 3. GPU tests ----------------------------------------------------------------------------
if [ $BUILT = 0 ]; then
  check kernel_tests 90 "$BUILD/tests/mole_kernel_tests" --gtest_brief=1 \
    --gtest_output=json:"$OUT/kernel_tests.json"
  check train_bf16_mixlora 60 "$BUILD/mole" train --set adapter.method=mixlora \
    --set log.dir="$OUT/run-mixlora" "${TRAIN_SET[@]}"
  check train_bf16_lora 60 "$BUILD/mole" train --set adapter.method=lora \
    --set log.dir="$OUT/run-lora" "${TRAIN_SET[@]}"
fi

# ---- 4. benchmarks ---------------------------------------------------------------------------
[ $BUILT = 0 ] && bench bench_kernels 60 "$BUILD/mole" bench kernels --device cuda --tokens 2048 \
  --hidden 4096 --intermediate 11008 --experts 8 --top-k 2 --r 16 --warmup 3 --iters 20 --json
for shape in llama-2-7b tinyllama; do
  mole_bench "$shape" lora
  mole_bench "$shape" mixlora
  bench "peer_${shape}" 150 "$PY" tests/gpu/peer_bench.py --shape "$shape" --batch 4 --seq 512 \
    --experts 8 --top-k 2 --r 16 --warmup 2 --steps 6
done

# ---- 5. communication on the GPU -------------------------------------------------------------
if [ $BUILT = 0 ]; then
  check nccl_np1 60 "$BUILD/tests/mole_dist_tests" --gtest_filter='*Nccl*:*NCCL*' --gtest_brief=1
  check ep2_one_gpu_mpi 120 $MPIRUN -np 2 "$BUILD/mole" train --set adapter.method=mixlora \
    --set parallel.ep=2 --set parallel.backend=mpi --set log.dir="$OUT/run-ep2" "${TRAIN_SET[@]}"
fi

# ---- summary ---------------------------------------------------------------------------------
"$PY" tests/gpu/summarize.py "$RESULTS" "$BENCH" "$OUT/summary.json" "$(elapsed)"
