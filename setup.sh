#!/usr/bin/env bash
# Installs what mole needs on Debian 12 (only what is missing) and configures the build.
#
#   ./setup.sh                 install dependencies, configure ./build
#   ./setup.sh --deps-only     install dependencies only
#   ./setup.sh --tests         also what the tests use: iproute2 (hosts as network namespaces) and
#                              a SLURM cluster on this machine (slurm-wlm, munge)
#   BUILD_DIR=dir ./setup.sh   configure another build folder
#   CMAKE_ARGS="..." ./setup.sh   extra CMake arguments (e.g. -DCMAKE_PREFIX_PATH=... for a CUDA LibTorch)
set -euo pipefail

cd "$(dirname "$0")"
BUILD_DIR=${BUILD_DIR:-build}
PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config
  libtorch-dev libopenblas0-pthread
  libopenmpi-dev openmpi-bin
  libgloo-dev
  libprotobuf-dev protobuf-compiler
  libspdlog-dev libfmt-dev
  libgtest-dev
  nlohmann-json3-dev libyaml-cpp-dev libcli11-dev
  zlib1g-dev libicu-dev
)
TEST_PACKAGES=(iproute2 slurm-wlm munge)
deps_only=0
for arg in "$@"; do
  case "$arg" in
    --deps-only) deps_only=1 ;;
    --tests) PACKAGES+=("${TEST_PACKAGES[@]}") ;;
    *) echo "setup: unknown option '$arg' (known: --deps-only, --tests)" >&2; exit 2 ;;
  esac
done

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
else
  echo "setup: all Debian packages present"
fi

[ "$deps_only" = 1 ] && exit 0

# shellcheck disable=SC2086
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo ${CMAKE_ARGS:-}
echo "setup: configured $BUILD_DIR; build with: cmake --build $BUILD_DIR"
