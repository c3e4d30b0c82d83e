#!/usr/bin/env bash
# What one lent-GPU call runs for the training issue (see ../shared/gpu/README.md): the bf16
# training-throughput benchmark, then training parity and jitted gradients on the GPU.
# Usage on the device machine: bash scripts/gpu_training_run.sh (writes under $OUT).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c 'import jax, torch, equinox, haiku, optax, timm; print("jax", jax.__version__, jax.devices()); print("torch", torch.__version__, "timm", timm.__version__, "equinox", equinox.__version__, "haiku", haiku.__version__, "optax", optax.__version__)' 2>&1 | tee -a "$OUT/device.txt"
timeout "${BENCH_S:-330}" python3 benchmarks/bench_training.py --steps 15 --warmup 3 \
  --out "$OUT/training_gpu.json" 2>&1 | tee "$OUT/bench.log" | grep -v Warning | tail -15
timeout "${TEST_S:-150}" python3 -m pytest tests/test_training.py -q -p no:cacheprovider -x \
  -k "(matches_pytorch and not float64 and (basic or bottleneck or googlenet)) or (jitted_gradients and (resnet50- or googlenet-))" \
  > "$OUT/tests.log" 2>&1; echo "pytest rc $?"; tail -5 "$OUT/tests.log"
