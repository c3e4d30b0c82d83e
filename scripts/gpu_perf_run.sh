#!/usr/bin/env bash
# What one lent-GPU call runs for the performance issue (see ../shared/gpu/README.md): `zoo bench`
# in bf16 at batch 256 for ResNet-50 and GoogLeNet (inference and a training step, zoo beside
# PyTorch eager, channels_last and torch.compile), the start-up benchmark (cold and warm compilation
# cache in fresh processes), and fp32 parity on the GPU at highest precision.
# Usage (device tool, carry [".whl"]): bash scripts/gpu_perf_run.sh   (writes under $OUT)
# Each stage has its own time limit (env overrides) so that one slow stage cannot eat the call.
# A dry run on the CPU: DEVICE=cpu BATCH=2 SIZE=64 BENCH_ARGS="--impl zoo-haiku,torch-eager-nchw" \
#   STARTUP_ARGS="--predict-archs test_resnet --train-archs --create-archs" OUT=/tmp/out bash scripts/gpu_perf_run.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1
# JAX and PyTorch share the GPU in one process: JAX must not take most of its memory up front.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 ZOO_CACHE_DIR=/tmp/zoo-cache
{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; } | tee "$OUT/device.txt"
python3 -c 'import jax, torch, equinox, haiku, optax, timm; print("jax", jax.__version__, jax.devices()); print("torch", torch.__version__, "timm", timm.__version__, "equinox", equinox.__version__, "haiku", haiku.__version__, "optax", optax.__version__)' 2>&1 | tee -a "$OUT/device.txt"

bench() {  # arch mode seconds [extra args]
  local arch=$1 mode=$2 limit=$3; shift 3
  timeout "$limit" python3 cli.py bench "$arch" --device "${DEVICE:-gpu}" --dtype bfloat16 --batch "${BATCH:-256}" \
    --size "${SIZE:-224}" --mode "$mode" --repeats 10 --warmup 3 --json "$OUT/bench_${DEVICE:-gpu}_${arch}_${mode}.json" \
    ${BENCH_ARGS:-} "$@" 2>&1 \
    | grep -v Warning | tee "$OUT/bench_${arch}_${mode}.log" | tail -12
  echo "bench $arch $mode rc ${PIPESTATUS[0]}"
}
bench resnet50 both "${R50_S:-200}"
bench googlenet both "${GOOGLENET_S:-200}"

STARTUP_ARGS=${STARTUP_ARGS:-"--predict-archs resnet50 googlenet --train-archs resnet50 --create-archs"}
timeout "${STARTUP_S:-100}" python3 benchmarks/bench_startup.py $STARTUP_ARGS --frameworks haiku equinox \
  --repeats 1 --out "$OUT/startup_${DEVICE:-gpu}.json" 2>&1 \
  | grep -v Warning | tail -12

timeout "${TEST_S:-60}" python3 -m pytest -q -p no:cacheprovider -x tests/test_cli.py -k verify \
  > "$OUT/tests.log" 2>&1; echo "pytest rc $?"; tail -3 "$OUT/tests.log"
