#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with an NVIDIA GPU, torch with CUDA, nvcc and no
# network: build with the CUDA kernels, run the whole test suite (CUDA tests included), run every
# CUDA kernel under compute-sanitizer (memcheck, racecheck), and benchmark loss, reparameterize and
# the training step on the GPU (float32 and bfloat16). Results go to $OUT (default runs/gpu-check).
#
#   bash benchmarks/gpu_check.sh                      # every phase, from the repository root
#   PHASES="build test" bash benchmarks/gpu_check.sh  # some phases: build test sanitize bench train
#   TESTS="-m cuda" PHASES="build test" ...           # pytest selection for the test phase
#   BENCH_RUNS="graph step" ...                       # benchmark runs: plain graph step
#   GRAPH_ONLY=loss PLAIN_ONLY=loss,reparam ...       # which benchmarks the graph / plain runs take
#   REQUIRE_GPU=0 PHASES=build ...                    # rehearse without a GPU (a CUDA torch on PATH)
#   MNIST=DIR TRAIN_EPOCHS=3 PHASES=train ...         # vae-ext train on the GPU, fused and reference
#
# On the H100 machine (2026-11-24) the build took 70-90 s, the CUDA tests 10 s, memcheck 10 s,
# racecheck 40 s, the plain loss+reparam benchmarks 4.5 min and the graph loss benchmark about 4 min:
# a whole run does not fit one 10-minute device call, so split it by PHASES / BENCH_RUNS.
#
# The build phase installs the package the README's way (pip install --no-build-isolation .) and
# writes the built extension, gzipped, to $OUT/_C.so.gz. Without "build" in PHASES the script uses
# .gpu/_C.so.gz when the checkout has it (that file, carried to a fresh machine: it is unpacked into
# vae_ext/ and the checkout imported), else the package an earlier build installed on this machine.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-runs/gpu-check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PHASES="${PHASES:-build test sanitize bench}"  # train only when asked
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ($(date +%T))"; }
has() { [[ " $PHASES " == *" $1 "* ]]; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# Without a usable GPU every CUDA test skips and the run would look fine: stop instead.
# (REQUIRE_GPU=0 rehearses the build and the carried-extension path on a machine without one.)
if [ "${REQUIRE_GPU:-1}" = 1 ] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "torch.cuda.is_available() is False: no GPU to check"; exit 1
fi

if has build; then
  step "build (pip install --no-build-isolation --no-deps .)"
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    timeout 480 python3 -m pip install -v --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1
  rc=$?; grep -E "error:|warning: .*(spill|stack)|vae_ext: building" "$OUT/build.log" | head -60
  [ $rc -eq 0 ] || { echo "build failed ($rc)"; tail -40 "$OUT/build.log"; exit 1; }
  so=$(cd / && python3 -c "import vae_ext._C as c; print(c.__file__)")
  gzip -c "$so" > "$OUT/_C.so.gz" && echo "built: $so (gzipped copy in \$OUT/_C.so.gz)"
  cd "$OUT"  # import the installed package, not the source tree
elif [ -f .gpu/_C.so.gz ]; then
  # no build: the extension gzipped by an earlier build phase, carried to the machine in .gpu/
  gunzip -c .gpu/_C.so.gz > "vae_ext/_C.$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("SOABI"))').so"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  cd "$OUT"  # no build: the package an earlier build phase installed on this machine
fi
python3 -c "import vae_ext; i = vae_ext.build_info(); print(i); assert i['cuda_kernels'], 'no CUDA kernels built'" || exit 1

if has test; then
  step "tests ${TESTS:-(all)}"
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -rs --maxfail=20 -p no:cacheprovider ${TESTS:-} "$ROOT/tests" \
    > "$OUT/pytest.log" 2>&1
  rc=$?; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | tail -40; tail -1 "$OUT/pytest.log"
  [ $rc -eq 0 ] || { status=1; grep -B5 -A40 -m3 "^____" "$OUT/pytest.log" | head -150; }
fi

if has sanitize; then
  step "compute-sanitizer"
  for tool in ${SANITIZERS:-memcheck racecheck}; do
    timeout "${SAN_TIMEOUT:-300}" compute-sanitizer --tool "$tool" --error-exitcode 3 python3 "$ROOT/benchmarks/sanitize_kernels.py" \
      > "$OUT/sanitizer-$tool.log" 2>&1
    rc=$?; echo "$tool: exit $rc"; tail -5 "$OUT/sanitizer-$tool.log"
    [ $rc -eq 0 ] || status=1
  done
fi

if has bench; then
  # plain: every benchmark as a user calls it (host overhead included); graph: loss and reparam as
  # CUDA-graph replays (device time); step: the training step alone.
  for run in ${BENCH_RUNS:-plain graph}; do
    case "$run" in
      plain) extra=(--dtype float32 --dtype bfloat16 --only "${PLAIN_ONLY:-loss,objectives,reparam,step}") ;;
      graph) extra=(--dtype float32 --dtype bfloat16 --only "${GRAPH_ONLY:-loss,objectives,reparam}" --cuda-graph) ;;
      step) extra=(--dtype float32 --only step) ;;
      *) echo "BENCH_RUNS: unknown run $run"; status=1; continue ;;
    esac
    step "benchmarks: $run ${extra[*]} ${BENCH_ARGS:-}"
    timeout "${BENCH_TIMEOUT:-540}" python3 "$ROOT/benchmarks/run.py" --device cuda "${extra[@]}" \
      --out "$OUT/gpu-$run.json" --chart "$OUT/gpu-$run.png" --no-progress ${BENCH_ARGS:-} > "$OUT/bench-$run.log" 2>&1
    rc=$?; sed -n '/^Machine/,$p' "$OUT/bench-$run.log" | grep -v "^-----"
    [ $rc -eq 0 ] || { echo "benchmark $run: exit $rc"; tail -20 "$OUT/bench-$run.log"; status=1; }
  done
fi

if has train; then
  # The training step as a user runs it: the same MLP VAE on MNIST, the fused loss and the
  # reference loss, a few epochs each. metrics.csv has each epoch's seconds and test -ELBO. MNIST is
  # not in the repository: copy ../shared/data/mnist into .gpu/mnist and carry .gpu (the device
  # machine has no ../shared); without it the scikit-learn digits are used.
  mnist="${MNIST:-$ROOT/.gpu/mnist}"
  [ -d "$mnist" ] || mnist="$ROOT/../shared/data/mnist"
  if [ -d "$mnist" ]; then data=(--data "mnist:$mnist" --train-split 8000); else data=(); fi
  for impl in fused reference; do
    step "train ($impl) ${data[*]:-digits}, ${TRAIN_EPOCHS:-3} epochs"
    flag=(); [ "$impl" = reference ] && flag=(--reference)
    timeout "${TRAIN_TIMEOUT:-240}" python3 -m vae_ext train "${data[@]}" --epochs "${TRAIN_EPOCHS:-3}" \
      --device "${TRAIN_DEVICE:-cuda}" --no-progress --out "$OUT/train-$impl" "${flag[@]}" > "$OUT/train-$impl.log" 2>&1
    rc=$?; tail -3 "$OUT/train-$impl.log"; cat "$OUT/train-$impl/metrics.csv" 2>/dev/null
    [ $rc -eq 0 ] || { echo "train $impl: exit $rc"; status=1; }
  done
fi

echo; echo "gpu_check: $([ $status -eq 0 ] && echo OK || echo FAILED); results in $OUT"
exit $status
