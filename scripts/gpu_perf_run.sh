#!/usr/bin/env bash
# What lent-GPU calls run for the performance issue (see ../shared/gpu/README.md): `zoo bench`
# in bf16 at batch 256 for ResNet-50 and GoogLeNet (inference and a training step, zoo beside
# PyTorch eager, channels_last and torch.compile), the start-up benchmark (cold and warm compilation
# cache in fresh processes), a kernel profile of ResNet-50's rows (with 1x1 convolutions as dots
# and as convolutions), fp32 parity on the GPU at highest precision, and (stage `flags`, not in the
# default) the cold compile and step time of one train step under XLA GPU flag sets.
# Usage (device tool, carry [".whl"]): STAGES=bench bash scripts/gpu_perf_run.sh (~8 min), then
# STAGES="startup profile parity" (~6 min; all four, the default, do not fit one 10-minute call);
# STAGES=flags (~4 min: GoogLeNet's Haiku step, 3 flag sets, ~45 s of compile each on an H200).
# The flags stage also times inference (FLAGS_MODE=inference), for the epilogue-fusion levers of
# docs/benchmarks.md's kernel profile, e.g. STAGES=flags FLAGS_MODE=inference FLAGS_ARCH=resnet50
#   FLAGS_IMPL=zoo-haiku,zoo-haiku-folded,torch-eager-cl FLAG_SETS="default;--xla_gpu_experimental_enable_conv_fusion=true;--xla_gpu_cudnn_gemm_fusion_level=2"
# Writes under $OUT (file names in letters, digits, '_', '.', '-' only: the device tool returns no
# others). On an H200 the bench stage's GoogLeNet run needed more than 180 s (2026-11-26) and more
# than 280 s (2026-11-28: Haiku's cold train step 72 s, torch.compile's train row unfinished).
# Each stage has its own time limit (env overrides) so that one slow stage cannot eat the call.
# STAGES=bngrad (~2 min) times the closed-form BatchNorm derivative against autodiff in one process.
# With 15 minutes of device time (machine start included): STAGES=bench first, then, if time is
# left, STAGES="bngrad startup parity" with BNGRAD_S, STARTUP_S and TEST_S fitting what remains.
# What that took on 2026-11-28 (H200): bench 430 s (GoogLeNet stopped at 280 s) plus ~30 s to start;
# "bngrad parity startup" 138 s; flags, inference, ResNet-50, 3 sets 103 s. The machine keeps /tmp
# (the compilation cache) between calls while it stays warm (30 s idle).
# STAGES=ab times this tree beside itself under AB_ENV (e.g. AB_ENV=ZOO_BN_GRAD=autodiff), or beside
# another commit's checkout (AB_TREE); see the stage.
# A dry run on the CPU: DEVICE=cpu BATCH=2 SIZE=64 BENCH_ARGS="--impl zoo-haiku,torch-eager-nchw" \
#   STARTUP_ARGS="--predict-archs test_resnet --train-archs --create-archs" PROFILE_ARCH=test_resnet \
#   PARITY_MODELS=test_resnet OUT=/tmp/out bash scripts/gpu_perf_run.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the ab stage runs in other trees
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
STAGES=${STAGES:-"bench startup profile parity"}
has() { [[ " $STAGES " == *" $1 "* ]]; }
if has bench; then
  bench resnet50 both "${R50_S:-230}"
  bench googlenet both "${GOOGLENET_S:-340}"
fi

if has startup; then
  STARTUP_ARGS=${STARTUP_ARGS:-"--predict-archs resnet50 --train-archs resnet50 --create-archs"}
  timeout "${STARTUP_S:-120}" python3 benchmarks/bench_startup.py $STARTUP_ARGS --frameworks haiku equinox \
    --modes cold warm --repeats 1 --out "$OUT/startup_${DEVICE:-gpu}.json" 2>&1 | grep -v Warning | tail -12
  echo "startup rc ${PIPESTATUS[0]}"
fi

if has profile; then
  timeout "${PROFILE_S:-130}" python3 benchmarks/profile_gpu.py "${PROFILE_ARCH:-resnet50}" --device "${DEVICE:-gpu}" \
    --batch "${BATCH:-256}" --size "${SIZE:-224}" --dots cpu all --out "$OUT/profile_${DEVICE:-gpu}.json" 2>&1 \
    | grep -v -i "warning\|USDT\|profiler_st" | tail -20
  echo "profile rc ${PIPESTATUS[0]}"
fi

if has flags; then
  # The untried lever for GoogLeNet's long GPU compile (docs/benchmarks.md, "Cold compile"): each
  # flag set in a fresh process with the compilation cache off, so first_call_s is a cold compile.
  IFS=';' read -r -a sets <<< "${FLAG_SETS:-default;--xla_gpu_autotune_level=0;--xla_gpu_enable_triton_gemm=false}"
  for set in "${sets[@]}"; do
    tag=$(echo "$set" | tr -c 'A-Za-z0-9_\n' '_' | sed 's/^_*//;s/_*$//')
    flags=$([ "$set" = default ] && echo "${XLA_FLAGS:-}" || echo "${XLA_FLAGS:-} $set" | xargs)
    # An empty XLA_FLAGS would be read as a file name: leave it out then.
    env ${flags:+XLA_FLAGS="$flags"} ZOO_COMPILATION_CACHE=0 timeout "${FLAGS_S:-100}" python3 cli.py bench \
      "${FLAGS_ARCH:-googlenet}" --device "${DEVICE:-gpu}" --dtype bfloat16 --batch "${BATCH:-256}" --size "${SIZE:-224}" \
      --mode "${FLAGS_MODE:-train}" --impl "${FLAGS_IMPL:-zoo-haiku}" --repeats 10 --warmup 3 \
      --json "$OUT/flags_${DEVICE:-gpu}_${FLAGS_MODE:-train}_${tag}.json" 2>&1 | grep -v Warning \
      | grep -i "zoo\|torch\|rc\|error" | tail -8
    echo "flags [$set] rc ${PIPESTATUS[0]}"
  done
fi

if has ab; then
  # Two variants of zoo alternately in one call (device time is scarce): this tree as it is against
  # this tree under AB_ENV (a switch read when zoo traces, e.g. AB_ENV=ZOO_BN_GRAD=autodiff against the
  # closed-form BatchNorm derivative of docs/benchmarks.md, the default), or against another commit's checkout
  # AB_TREE inside the repository root (`git worktree add`, carried: carry [".whl", "<tree>"]).
  # ~1-2 min per run on an H200 for a ResNet-50 train step in both frameworks.
  if [ -n "${AB_ENV:-}" ]; then variants=("$PWD|" "$PWD|$AB_ENV" "$PWD|" "$PWD|$AB_ENV")
  else variants=("$PWD|" "${AB_TREE:?set AB_ENV or AB_TREE}|" "$PWD|" "$AB_TREE|"); fi
  for v in "${variants[@]}"; do
    tree=${v%%|*} extra=${v#*|}
    tag=$(basename "$(cd "$tree" && pwd)")${extra:+_$(echo "$extra" | tr -c 'A-Za-z0-9_\n' '_')}
    # shellcheck disable=SC2086  # AB_ENV: NAME=value words
    (cd "$tree" && env $extra PYTHONPATH="/tmp/site:$PWD" timeout "${AB_S:-150}" python3 cli.py bench "${AB_ARCH:-resnet50}" \
      --device "${DEVICE:-gpu}" --dtype bfloat16 --batch "${BATCH:-256}" --size "${SIZE:-224}" --mode "${AB_MODE:-train}" \
      --impl "${AB_IMPL:-zoo-haiku,zoo-equinox}" --repeats 10 --warmup 3 ${BENCH_ARGS:-} \
      --json "$OUT/ab_${DEVICE:-gpu}_${tag}_$(date +%s).json") 2>&1 | grep -v Warning | grep -i "zoo\|torch\|error" | tail -6
    echo "ab $tag rc ${PIPESTATUS[0]}"
  done
fi

if has bngrad; then
  # Training BatchNorm's derivative, autodiff (ZOO_BN_GRAD=autodiff) against the closed form (the default): both steps
  # compiled in one process and timed alternately (docs/benchmarks.md, "Training BatchNorm's derivative
  # in closed form"). ResNet-50, Haiku and Equinox (the closed form applies to both since the
  # nineteenth session): four compilations, ~2 min.
  timeout "${BNGRAD_S:-300}" python3 benchmarks/bench_bn_grad.py --device "${DEVICE:-gpu}" --dtype bfloat16 \
    --batch "${BATCH:-256}" --sizes "${SIZE:-224}" --archs ${BNGRAD_ARCHS:-resnet50} \
    --frameworks ${BNGRAD_FRAMEWORKS:-haiku equinox} --rounds 10 \
    --out "$OUT/bn_grad_${DEVICE:-gpu}.json" 2>&1 | grep -v -i warning | tail -8
  echo "bngrad rc ${PIPESTATUS[0]}"
fi

if has parity; then
  timeout "${TEST_S:-90}" python3 scripts/parity_report.py --models ${PARITY_MODELS:-resnet50} --sizes 97x131 \
    --device "${DEVICE:-gpu}" --out "$OUT/parity_${DEVICE:-gpu}" > "$OUT/parity.log" 2>&1
  echo "parity rc $?"; grep -v -i warning "$OUT/parity.log" | tail -8
fi
