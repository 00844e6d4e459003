#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no Rust: runs the test and
# benchmark binaries built elsewhere by tools/build-gpu-bin.sh (x86-64 Linux), and
# ends with a summary table. Usage: tools/gpu-check.sh [BIN_DIR] (default gpu-bin/).
# About 5 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-gpu-bin}"
OUTDIR="${OUT:-/tmp}"
log="$OUTDIR/gpu-check.log"
: > "$log"
echo "== device" | tee -a "$log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"

# cuBLAS: the system's CUDA, or the one PyTorch ships (cuBLAS 12 or 13).
if [ -z "${SAM_UNET_CUBLAS:-}" ]; then
  lib=$(find /usr/local/cuda*/lib64 /usr/local/lib /opt /usr/lib -name 'libcublas.so.1[23]*' -not -name '*Lt*' 2>/dev/null | sort | head -1)
  if [ -n "$lib" ]; then
    export SAM_UNET_CUBLAS="$lib"
    export LD_LIBRARY_PATH="$(dirname "$lib"):${LD_LIBRARY_PATH:-}"
  fi
fi
echo "cuBLAS: ${SAM_UNET_CUBLAS:-(loader path)}" | tee -a "$log"

# NCCL (the data-parallel test): the system's, or the wheel PyTorch ships,
# whose libnccl.so.2 gets the libnccl.so name the loader looks for.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl.so '; then
  sites=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
  nccl=$(find /usr/local/lib /usr/lib /opt $sites -name 'libnccl.so.2*' 2>/dev/null | sort | head -1)
  if [ -n "$nccl" ]; then
    mkdir -p "$OUTDIR/nccl-lib" && ln -sf "$nccl" "$OUTDIR/nccl-lib/libnccl.so"
    export LD_LIBRARY_PATH="$OUTDIR/nccl-lib:$(dirname "$nccl"):${LD_LIBRARY_PATH:-}"
  fi
fi
echo "NCCL: ${nccl:-(loader path)}" | tee -a "$log"

echo "== CUDA ops against their CPU twins" | tee -a "$log"
SAM_UNET_REQUIRE_GPU=1 timeout 120 "$BIN/cuda_ops" 2>&1 | tee -a "$log"
test_rc=${PIPESTATUS[0]}
echo "== the whole model on CUDA against the CPU backend" | tee -a "$log"
SAM_UNET_REQUIRE_GPU=1 timeout 240 "$BIN/cuda_model" 2>&1 | tee -a "$log"
model_rc=${PIPESTATUS[0]}
[ "$model_rc" -ne 0 ] && test_rc=$model_rc

echo "== end to end (bench, random SAM-UNet-50)" | tee -a "$log"
for dt in f32 bf16; do
  timeout 150 "$BIN/bench" --device cuda --dtype "$dt" --boxes 1,32 --batch 1,8,64 --runs 10 2>&1 | tee -a "$log" "$OUTDIR/bench-cuda.jsonl" >/dev/null
done
# The same without CUDA graphs (eager launches), to see what the graphs buy.
echo '{"note":"next lines: bf16 with SAM_UNET_CUDA_GRAPHS=0 (eager)"}' >> "$OUTDIR/bench-cuda.jsonl"
SAM_UNET_CUDA_GRAPHS=0 timeout 100 "$BIN/bench" --device cuda --dtype bf16 --boxes 1,32 --batch 1 --runs 10 2>&1 | tee -a "$log" "$OUTDIR/bench-cuda.jsonl" >/dev/null

# Training steps (issue 9: images per second at 16, 32 and 50 images, 5 masks each).
echo '{"note":"next lines: training steps, f32"}' >> "$OUTDIR/bench-cuda.jsonl"
for n in 16 32 50; do
  timeout 120 "$BIN/bench" --device cuda --train "$n" --train-boxes 5 --runs 3 2>&1 | tee -a "$log" "$OUTDIR/bench-cuda.jsonl" >/dev/null
done

# segment-volume on a 512 x 512 x 100 synthetic CT with 3 boxes (issue 12).
echo '{"note":"next line: segment-volume, 100 slices, 3 objects"}' >> "$OUTDIR/bench-cuda.jsonl"
timeout 120 "$BIN/bench" --device cuda --volume 100 --objects 3 2>&1 | tee -a "$log" "$OUTDIR/bench-cuda.jsonl" >/dev/null

echo "== benchmarks (cuda_*)" | tee -a "$log"
timeout 240 "$BIN/cpu_ops" --bench cuda_ --warm-up-time 1 --measurement-time 2 --noplot 2>&1 | tee -a "$log" >/dev/null
bench_rc=${PIPESTATUS[0]}

if [ "${SKIP_PYTORCH:-0}" != 1 ] && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  echo "== PyTorch eager on the same GPU" | tee -a "$log"
  timeout 240 python3 tools/pytorch_gpu_baseline.py 2>&1 | tee -a "$log" "$OUTDIR/pytorch-gpu.jsonl" >/dev/null
  for n in 16 32 50; do
    timeout 120 python3 tools/pytorch_baseline.py --device cuda --train "$n" --train-boxes 5 --runs 3 2>/dev/null | tee -a "$log" "$OUTDIR/pytorch-gpu.jsonl" >/dev/null
  done
fi

passed=$(grep -cE '^test .* ok$' "$log")
failed=$(grep -cE '^test .* FAILED' "$log")
echo
echo "== summary"
printf '%-40s %s\n' "device" "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
printf '%-40s %s\n' "tests passed / failed" "$passed / $failed (exit $test_rc)"
grep -E 'worst index|relative L2' "$log" | sed 's/^/  /'
awk '/^cuda_/{name=$1} /time:/{ if (name!="") { printf "%-40s %s %s\n", name, $4, $5; name="" } }' "$log"
echo "(criterion exit $bench_rc; full log: $log)"
if [ -s "$OUTDIR/bench-cuda.jsonl" ]; then
  echo "bench (ours, CUDA):"
  grep '^{' "$OUTDIR/bench-cuda.jsonl" | sed 's/^/  /'
fi
if [ -s "$OUTDIR/pytorch-gpu.jsonl" ]; then
  echo "PyTorch eager, same GPU:"
  grep '^{' "$OUTDIR/pytorch-gpu.jsonl" | sed 's/^/  /'
fi
[ "$test_rc" -eq 0 ] && [ "$failed" -eq 0 ]
