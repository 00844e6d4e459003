#!/usr/bin/env bash
# Builds, here (x86-64 Linux with Rust), the binaries tools/gpu-check.sh runs on a
# GPU machine without Rust, and puts them, stripped, into gpu-bin/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-cuda-tools.sh
export SAM_UNET_CUDA_TOOLS="$(pwd)/.cuda-tools" SAM_UNET_REQUIRE_KERNELS=1
pick() { grep -o "target/release/deps/$1-[0-9a-f]*" | tail -1; }
tests=$(cargo test --release --no-run 2>&1)
benches=$(cargo bench --no-run 2>&1)
cargo build --release --bin bench
rm -rf gpu-bin && mkdir -p gpu-bin
cp "$(echo "$tests" | pick cuda_ops)" gpu-bin/cuda_ops
cp "$(echo "$tests" | pick cuda_model)" gpu-bin/cuda_model
cp "$(echo "$benches" | pick cpu_ops)" gpu-bin/cpu_ops
cp target/release/bench gpu-bin/bench
strip gpu-bin/*
ls -la gpu-bin
