"""Host-side cost of calling zoo's jitted steps: `eqx.filter_jit` against zoo's leaner wrapper
(`zoo._jit`), on the same states, in one process, alternating.

    python benchmarks/bench_dispatch.py --arch resnet50 --out benchmarks/results/dispatch_cpu.json

Rows:
- identity step: a step that returns the TrainState it is given (donated) and computes nothing, so
  its time is the wrapper's Python (flattening the state, partitioning, the cache lookup, rebuilding
  the result) plus JAX's dispatch: what a GPU waits for between two synchronous steps.
- train step (batch 1, 32x32: little compute): `zoo.training`'s step body under each wrapper;
  `return` = time until the call returns (with asynchronous dispatch the host is then free),
  `total` = until its loss is ready.
- Equinox predict (batch 1, 32x32): the model passed through `eqx.filter_jit` in each call, as
  before, against `zoo.Model`'s predict, which takes its arrays flattened once.
Medians of `--repeats` calls after 5 untimed ones, in `--rounds` alternating rounds.

On this CPU an `eqx.filter_jit` call returned only once its result was ready (return = total),
while a `jax.jit` call returns once the program is enqueued (JAX's asynchronous CPU dispatch;
`--sync` turns that off for comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/dispatch_cpu.json")
    ap.add_argument("--sync", action="store_true", help="turn JAX's asynchronous CPU dispatch off")
    args = ap.parse_args()
    if args.sync:
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import zoo.equinox
    import zoo.haiku
    import zoo.training as zt
    from zoo import _jit
    from zoo.io import Loaded
    from zoo.model import make_predict

    tx = optax.sgd(0.1, momentum=0.9)

    def timed(call, n: int) -> tuple[float, float]:
        for _ in range(5):
            jax.block_until_ready(call())
        ret, tot = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            out = call()
            t1 = time.perf_counter()
            jax.block_until_ready(out)
            ret.append(t1 - t0)
            tot.append(time.perf_counter() - t0)
        return statistics.median(ret) * 1e3, statistics.median(tot) * 1e3

    wrappers = {"eqx.filter_jit": lambda f: eqx.filter_jit(f, donate="all-except-first"),
                "zoo._jit": lambda f: _jit.jit(f, donate_argnums=(1,))}
    results: dict[str, dict[str, list]] = {}
    y = jnp.zeros((1,), jnp.int32)
    for fw in ("haiku", "equinox"):
        if fw == "haiku":
            net = zoo.haiku.create(args.arch)
            x = jnp.zeros((1, 32, 32, 3))
            params, state = net.init(jax.random.key(0), x, is_training=True)
            model = net
        else:
            params, state = zoo.equinox.create(args.arch, key=jax.random.key(0))
            x = jnp.zeros((1, 3, 32, 32))
            model = params
        holders = {}
        calls = {}
        for name, wrap in wrappers.items():
            ident = wrap(lambda batch, ts: (ts, {"loss": batch[0].sum()}))
            body = wrap(zt._step_body(model, tx, label_smoothing=0.0, aux_weight=zt.AUX_WEIGHT, remat=False))
            for kind, fn in (("identity step", ident), ("train step", body)):
                holder = holders[(kind, name)] = {"ts": jax.tree_util.tree_map(
                    lambda a: jnp.array(a) if isinstance(a, jax.Array) else a, zt.TrainState.create(params, state, tx))}

                def call(fn=fn, holder=holder):
                    holder["ts"], metrics = fn((x, y, None), holder["ts"])
                    return metrics["loss"]

                calls[(kind, name)] = call
        if fw == "equinox":
            new_predict = make_predict(Loaded(objects=(params, state), plan=None, metadata={}, framework="equinox"))
            old = eqx.filter_jit(lambda m, s, x: jax.vmap(lambda xi: m(xi, s)[0], axis_name=zoo.equinox.BATCH_AXIS)(x))
            inf = eqx.nn.inference_mode(params)
            calls[("predict", "eqx.filter_jit")] = lambda: old(inf, state, x)
            calls[("predict", "zoo._jit")] = lambda: new_predict(x)
        for r in range(args.rounds):
            for (kind, name), call in calls.items():
                ret, tot = timed(call, args.repeats)
                results.setdefault(f"{fw} {kind}", {}).setdefault(name, []).append([ret, tot])
                print(f"round {r} {fw:8s} {kind:14s} {name:15s} return {ret:8.3f} ms, total {tot:8.3f} ms", flush=True)

    rows = []
    print("| workload | eqx.filter_jit: return / total, ms | zoo._jit: return / total, ms | total, filter_jit / zoo |")
    print("|---|---:|---:|---:|")
    for workload, by in results.items():
        med = {n: [statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals)] for n, vals in by.items()}
        a, b = med["eqx.filter_jit"], med["zoo._jit"]
        rows.append({"workload": workload, "filter_jit_ms": a, "zoo_jit_ms": b, "rounds": by})
        print(f"| {workload} | {a[0]:.2f} / {a[1]:.2f} | {b[0]:.2f} / {b[1]:.2f} | {a[1] / b[1]:.2f}× |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "config": vars(args), "jax": jax.__version__, "equinox": eqx.__version__, "device": str(jax.devices()[0]),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
