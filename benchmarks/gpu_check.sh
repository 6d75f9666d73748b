#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with an NVIDIA GPU, torch with CUDA, nvcc and no
# network: build with the CUDA kernels, run the whole test suite (CUDA tests included), run every
# CUDA kernel under compute-sanitizer (memcheck, racecheck), and benchmark loss, reparameterize and
# the training step on the GPU (float32 and bfloat16). Results go to $OUT (default runs/gpu-check).
#
#   bash benchmarks/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step "build (pip install --no-build-isolation --no-deps .)"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" python3 -m pip install -q --no-build-isolation --no-deps . \
  2>&1 | tee "$OUT/build.log" || { echo "build failed"; exit 1; }
python3 -c "import vae_ext; i = vae_ext.build_info(); print(i); assert i['cuda_kernels'], 'no CUDA kernels built'" || exit 1

step "tests (CUDA tests must run, not skip)"
(cd "$OUT" && python3 -m pytest -q -rs "$OLDPWD/tests" -p no:cacheprovider 2>&1) | tee "$OUT/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer"
if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck; do
    (cd "$OUT" && compute-sanitizer --tool "$tool" --error-exitcode 3 python3 "$OLDPWD/benchmarks/sanitize_kernels.py") \
      2>&1 | tee "$OUT/sanitizer-$tool.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
else
  echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"; status=1
fi

step "benchmarks"
(cd "$OUT" && python3 "$OLDPWD/benchmarks/run.py" --device cuda --dtype float32 --dtype bfloat16 \
  --out gpu.json --chart gpu.png --no-progress) 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo; echo "gpu_check: $([ $status -eq 0 ] && echo OK || echo FAILED); results in $OUT"
exit $status
