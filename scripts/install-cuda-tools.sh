#!/usr/bin/env bash
# Installs NVRTC, the CUDA headers and ptxas from NVIDIA's PyPI wheels into
# .cuda-tools/ (no GPU, no system CUDA needed), so that build.rs compiles every
# kernel in cuda/ to PTX and ptxas checks it for sm_80 and sm_90.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${SAM_UNET_CUDA_TOOLS:-.cuda-tools}"
if [ -e "$dest/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ] && [ -e "$dest/nvidia/cuda_nvcc/bin/ptxas" ]; then
  echo "CUDA tools already in $dest"; exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --target "$dest" \
  "nvidia-cuda-nvrtc-cu12==12.9.*" "nvidia-cuda-runtime-cu12==12.9.*" "nvidia-cuda-nvcc-cu12==12.9.*"
chmod +x "$dest/nvidia/cuda_nvcc/bin/ptxas"
echo "CUDA tools installed in $dest"
