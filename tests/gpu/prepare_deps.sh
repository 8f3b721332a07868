#!/usr/bin/env bash
# Run on a Debian 12 machine with network, before a GPU run: downloads the Debian packages of
# the libraries mole builds against that the GPU machine's image may lack (header-only ones and
# small shared libraries), into .gpudeps/ (ignored by git). Copy `.gpudeps` along with the working tree;
# tests/gpu/run.sh unpacks them there when the image does not have the library itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpudeps/' .git/info/exclude 2>/dev/null || echo '/.gpudeps/' >> .git/info/exclude
mkdir -p .gpudeps
cd .gpudeps
PACKAGES=(
  libspdlog-dev libspdlog1.10 libfmt-dev libfmt9
  nlohmann-json3-dev libcli11-dev
  libyaml-cpp-dev libyaml-cpp0.7
  libgtest-dev
  libprotobuf-dev libprotobuf32 protobuf-compiler libprotoc32
  zlib1g-dev
)
apt-get download "${PACKAGES[@]}"
du -sh .
ls
