"""Parity sweep over every timm model built on `timm.models.resnet.ResNet`; writes the coverage
report (docs/coverage.md) and its data (docs/coverage.json).

    python scripts/sweep_resnets.py                      # all of them (hours on a small CPU)
    python scripts/sweep_resnets.py --models 'resnet1*' --out /tmp/cov

The model list is enumerated from timm at run time (`timm_resnet_names`). Each model gets random
weights with randomised norm statistics (`converters.torch_models.random_model`) and is checked
with `converters.verify.verify` in both frameworks, BatchNorm folded and not: fp32 at "highest",
batch 2, an odd non-square size (97x131; 95x127 where timm itself cannot run 97x131). Each model
runs in its own process, so one that runs out of memory or time fails alone, with its reason.
Results are saved after every model; `--resume` skips models already in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import platform
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZE = (97, 131)
# Odd and non-square too, and every stride-2 stage sees an even size: timm's avg anti-aliasing
# (AvgPool2d(2), floor) and avg_down shortcut (ceil_mode) disagree on odd sizes, so PyTorch
# itself fails on 97x131 for those models.
FALLBACK_SIZE = (95, 127)
BATCH = 2
FRAMEWORKS = ("haiku", "equinox")
# In float64 the port must agree with PyTorch to float64 rounding, amplified as much as the model
# amplifies fp32 rounding (PyTorch fp32's own distance from float64, scaled by the ratio of the
# unit roundoffs, 2^-53 / 2^-24), with a 100x margin for different summation orders.
F64_MARGIN = 100 * 2.0 ** -29
F64_FLOOR = 1e-12
# timm ResNet models deliberately left out of the registry, with the reason. Empty: all covered.
EXCLUDED: dict[str, str] = {}


class _Built(Exception):
    def __init__(self, model_cls: Any):
        super().__init__()
        self.model_cls = model_cls


def timm_resnet_names() -> list[str]:
    """`[n for n in timm.list_models() if isinstance(timm.create_model(n), ResNet)]`, without
    building ~1,300 models: timm entrypoints end in `build_model_with_cfg(model_cls, name, ...)`,
    which is swapped for a probe that reports `model_cls` and stops. Anything else (parts built
    under other names, entrypoints without the builder) is built for real, on the meta device
    (no memory, no init), and checked with isinstance."""
    import timm
    import timm.models
    import torch
    from timm.models.resnet import ResNet

    current = [""]

    def probe(model_cls: Any, variant: str, *args: Any, **kwargs: Any) -> Any:
        if variant != current[0]:
            # A part built on the way (a hybrid model's backbone): build it, probe the outer one.
            return original(model_cls, variant, *args, **kwargs)
        raise _Built(model_cls)

    original = timm.models._builder.build_model_with_cfg
    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("timm.models") and getattr(m, "build_model_with_cfg", None) is original]
    names = []
    try:
        for m in patched:
            m.build_model_with_cfg = probe
        for name in timm.list_models():
            entry = timm.models.model_entrypoint(name)
            current[0] = name
            try:
                with torch.device("meta"):
                    model = entry(pretrained=False)
            except _Built as built:
                cls = built.model_cls
                if isinstance(cls, type):
                    if issubclass(cls, ResNet):
                        names.append(name)
                    continue
                model = None  # a factory function, not a class: build it for real
            if model is None:
                for m in patched:
                    m.build_model_with_cfg = original
                try:
                    with torch.device("meta"):
                        model = timm.create_model(name, pretrained=False)
                finally:
                    for m in patched:
                        m.build_model_with_cfg = probe
            if isinstance(model, ResNet):
                names.append(name)
    finally:
        for m in patched:
            m.build_model_with_cfg = original
    return sorted(names)


def _runs_at(model: Any, size: tuple[int, int]) -> Optional[str]:
    """None if the PyTorch model runs at `size`, else its error."""
    import torch

    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
        return None
    except RuntimeError as e:
        return str(e).splitlines()[0]


def float64_check(name: str, model: Any, sd: Any, framework: str, *, fold_bn: bool, size: tuple[int, int],
                  batch: int = BATCH, overrides: Optional[dict] = None) -> dict[str, float]:
    """The port evaluated in float64 (jax_enable_x64; same weights, inputs, folding) against
    PyTorch in float64, and PyTorch fp32's own distance from float64.

    Random weights with randomised norm statistics can make a deep model's logits so sensitive to
    fp32 rounding that PyTorch fp32 is itself 1e-5 or more from float64, and two fp32
    implementations cannot agree to 1e-5. In float64 the same amplification applies to rounding
    ~5e8 times smaller, so agreement there (see `diagnose`) shows the port computes the same
    function, and the fp32 gap is rounding only."""
    import copy

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from converters.convert import convert_state_dict
    from converters.verify import compare, inputs, run_torch
    from zoo.model import make_predict

    x = inputs(batch, size, 3, 0)
    ref32 = run_torch(model, x, "cpu", "highest")
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    sd64 = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    with jax.enable_x64(True):
        loaded = convert_state_dict(name, sd64, framework, fold_bn=fold_bn, overrides=overrides or {},
                                    dtype=jnp.float64).loaded
        out64 = np.asarray(make_predict(loaded, jnp.float64)(jnp.asarray(x, jnp.float64)))
    assert out64.dtype == np.float64
    return {"f64_rel": compare(ref64, out64)["rel"], "torch_vs_f64": compare(ref64, ref32)["rel"]}


def judge(rel: float, top1: float, tol: float = 1e-5) -> bool:
    """The issue's bar: rel <= tol against PyTorch fp32 and the same top-1 for every sample."""
    return rel <= tol and top1 == 1.0


def diagnose(f64: dict[str, float]) -> str:
    """For a failure: is it a different function, or fp32 rounding the model amplifies? In float64
    the port must agree with PyTorch to max(F64_FLOOR, F64_MARGIN x PyTorch fp32's distance from
    float64) to be called rounding (see `float64_check`)."""
    rounding = f64["f64_rel"] <= max(F64_FLOOR, F64_MARGIN * f64["torch_vs_f64"])
    return (f"float64 parity {f64['f64_rel']:.1e} (PyTorch fp32 vs float64 {f64['torch_vs_f64']:.1e}): "
            + ("fp32 rounding, same function" if rounding else "a different function"))


def gradient_check(name: str, sd: Any, framework: str, *, size: tuple[int, int], batch: int = BATCH) -> dict[str, Any]:
    """One jitted training step (`zoo.training.make_train_step`: value_and_grad of the
    cross-entropy in training mode, then SGD) on the converted model: is it finite?"""
    import equinox as eqx
    import jax
    import numpy as np
    import optax

    import zoo.training as zt
    from converters.convert import convert_state_dict
    from converters.verify import inputs

    converted = convert_state_dict(name, sd, framework)
    x = inputs(batch, size, 3, 1)
    if framework == "haiku":
        import zoo.haiku

        model = zoo.haiku.build(converted.loaded.plan)
        params, state = converted.objects
        x = x.transpose(0, 2, 3, 1)
    else:
        model, state = converted.objects
        params = model
    tx = optax.sgd(1e-3)
    t0 = time.time()
    ts, metrics = zt.make_train_step(model, tx)(zt.TrainState.create(params, state, tx), x, np.arange(batch) % 7)
    leaves = jax.tree_util.tree_leaves(eqx.filter((ts.params, ts.state), eqx.is_array))
    finite = bool(np.isfinite(float(metrics["loss"])) and all(np.all(np.isfinite(np.asarray(v))) for v in leaves))
    return {"framework": framework, "loss": float(metrics["loss"]), "finite": finite,
            "seconds": round(time.time() - t0, 1)}


def check_model(name: str, *, batch: int = BATCH) -> dict[str, Any]:
    """Verify one registered model in both frameworks, folded and not, and take one jitted
    gradient in each framework. Never raises."""
    from converters.state_dict import load_state_dict
    from converters.torch_models import random_model
    from converters.verify import verify
    from zoo import registry

    row: dict[str, Any] = {"name": name, "results": [], "passed": False, "reason": ""}
    t0 = time.time()
    try:
        registry.get(name)
        model = random_model(name)
        row["params"] = int(sum(p.numel() for p in model.parameters()))
        size, why = SIZE, _runs_at(model, SIZE)
        if why is not None:
            size = FALLBACK_SIZE
            row["size_note"] = f"timm itself fails at {SIZE[0]}x{SIZE[1]}: {why}"
        row["size"] = list(size)
        sd = load_state_dict(model)
        for framework in FRAMEWORKS:
            for fold in (False, True):
                r = verify(name, sd, framework, fold_bn=fold, batch=batch, size=size, precision="highest",
                           reference=model)
                res = {"framework": framework, "fold_bn": fold, "rel": r.rel, "max_abs": r.max_abs, "top1": r.top1}
                res["passed"] = judge(r.rel, r.top1)
                if not res["passed"]:
                    res.update(float64_check(name, model, sd, framework, fold_bn=fold, size=size, batch=batch))
                    res["diagnosis"] = diagnose(res)
                row["results"].append(res)
        row["gradients"] = [gradient_check(name, sd, framework, size=size, batch=batch) for framework in FRAMEWORKS]
        failed = [f"{r['framework']}{' folded' if r['fold_bn'] else ''}: rel {r['rel']:.1e}, top-1 {r['top1']:.2f}, "
                  f"{r['diagnosis']}" for r in row["results"] if not r["passed"]]
        failed += [f"{g['framework']}: jitted gradient not finite" for g in row["gradients"] if not g["finite"]]
        row["passed"] = not failed
        row["reason"] = "; ".join(failed)
    except Exception as e:  # reported per model, the sweep goes on
        row["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    row["seconds"] = round(time.time() - t0, 1)
    return row


def check_gradients(name: str) -> dict[str, Any]:
    """`gradient_check` in both frameworks for one model, on the sweep's reference weights. Never
    raises."""
    from converters.state_dict import load_state_dict
    from converters.torch_models import random_model

    t0 = time.time()
    try:
        model = random_model(name)
        size = SIZE if _runs_at(model, SIZE) is None else FALLBACK_SIZE
        sd = load_state_dict(model)
        grads = [gradient_check(name, sd, fw, size=size) for fw in FRAMEWORKS]
        return {"name": name, "gradients": grads, "seconds": round(time.time() - t0, 1)}
    except Exception as e:  # reported per model, the sweep goes on
        return {"name": name, "gradients": [], "seconds": round(time.time() - t0, 1),
                "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def add_gradients(out: Path, patterns: list[str], timeout: float) -> None:
    """Take the jitted gradients of every model in OUT.json (one process per model) and rewrite
    the report, keeping the parity results."""
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["models"]
    todo = [r for r in rows if any(fnmatch.fnmatch(r["name"], p) for p in patterns)]
    todo.sort(key=lambda r: _param_estimate(r["name"]))
    t0 = time.time()
    with ModelProgress([r["name"] for r in todo]) as bar:
        for i, row in enumerate(todo):
            bar.start(row["name"])
            res = _check_in_subprocess(row["name"], timeout, flag="--one-gradients")
            row["gradients"] = res.get("gradients", [])
            if not row["gradients"] or not all(g["finite"] for g in row["gradients"]):
                row["passed"] = False
                row["reason"] = "; ".join(filter(None, [row["reason"], res.get("reason") or "jitted gradient not finite"]))
            print(f"[{i + 1}/{len(todo)}] {row['name']}: "
                  f"{'finite' if row['gradients'] and all(g['finite'] for g in row['gradients']) else 'FAIL'} "
                  f"({res.get('seconds', 0):.0f}s)", flush=True)
            data["meta"]["gradient_seconds"] = round(time.time() - t0, 1)
            _write(rows, [r["name"] for r in rows], data["meta"], out)
            bar.finish(row["name"])


def _check_in_subprocess(name: str, timeout: float, flag: str = "--one") -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, name]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"name": name, "results": [], "passed": False, "seconds": round(time.time() - t0, 1),
                "reason": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
    return {"name": name, "results": [], "passed": False, "seconds": round(time.time() - t0, 1),
            "reason": f"process exited with {proc.returncode}{killed}: {tail}"}


# Seconds per model in the 2026-11-25 sweep fit 11 s + 0.18 s per million parameters: a model's
# share of the ETA is its parameter count plus this fixed cost (models run smallest first, so a
# count of models would promise the end far too early).
_FIXED_COST_PARAMS = 60_000_000


_TYPICAL_PARAMS = 25_000_000  # for a model whose plan cannot be built (it will fail fast anyway)


def _stdout_is_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):  # replaced or closed stdout: assume the worst
        return True


class ModelProgress:
    """A rich progress bar over models (the current one's name, models done, elapsed, ETA) on
    stderr, drawn only where stderr is a terminal: logged output stays as it was.

    The log lines keep going to stdout. Where stdout is the same terminal, rich prints them above
    the bar (redirect_stdout); where it is a file, it is left alone. Where it is a pipe there is no
    bar: `| tee` would write the lines into the terminal behind rich's back, across the bar."""

    def __init__(self, names: list[str]):
        estimates = {n: _param_estimate(n) for n in names}
        self.weights = {n: float(e if e < 1 << 62 else _TYPICAL_PARAMS) + _FIXED_COST_PARAMS
                        for n, e in estimates.items()}
        self.count, self.done = len(names), 0
        self.progress: Optional[Progress] = None
        self.task: Any = None

    def __enter__(self) -> "ModelProgress":
        console = Console(stderr=True)
        stdout_tty = sys.stdout.isatty()
        if console.is_terminal and self.count and (stdout_tty or not _stdout_is_pipe()):
            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                TextColumn("{task.fields[done]}/{task.fields[count]} models"), TimeElapsedColumn(),
                _EtaColumn(), console=console, redirect_stdout=stdout_tty, redirect_stderr=True)
            self.progress.start()
            self.task = self.progress.add_task("", total=sum(self.weights.values()), done=0, count=self.count)
        return self

    def start(self, name: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=name)

    def finish(self, name: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress.update(self.task, advance=self.weights.get(name, 0.0), done=self.done)

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description="done" if exc[0] is None else "stopped")
            self.progress.stop()


class _EtaColumn(ProgressColumn):
    """Time left at the mean rate so far: rich's own estimate looks at the last 30 s only, which
    often holds no finished model at all."""

    def render(self, task: Any) -> Text:
        if not task.completed or task.elapsed is None:
            return Text("ETA -:--:--", style="progress.remaining")
        left = task.elapsed * (task.total - task.completed) / task.completed
        return Text(f"ETA {datetime.timedelta(seconds=int(left))}", style="progress.remaining")


def _param_estimate(name: str) -> int:
    """Parameter count from the plan (for ordering small models first), without building."""
    from zoo import registry

    try:
        plan = registry.get_spec(name).plan()
    except Exception:
        return 1 << 62
    convs = sum(c.out_ch * (c.in_ch // c.groups) * c.kernel ** 2 for c in plan.all_convs())
    return convs + plan.fc.in_features * plan.fc.out_features


def run_sweep(names: Iterable[str], out: Path, *, isolate: bool = True, timeout: float = 3600,
              resume: bool = False, rerun_failed: bool = False, log=print) -> list[dict[str, Any]]:
    import timm

    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    names = list(names)
    done: dict[str, dict] = {}
    started = None
    if resume and json_path.exists():
        previous = json.loads(json_path.read_text())
        done = {r["name"]: r for r in previous["models"] if r["passed"] or not rerun_failed}
        started = previous["meta"].get("started")
    meta = {"timm": timm.__version__, "size": list(SIZE), "fallback_size": list(FALLBACK_SIZE),
            "batch": BATCH, "precision": "highest", "tolerance": {"rel": 1e-5, "top1": 1.0},
            "platform": platform.platform(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "enumerated": len(names), "excluded": EXCLUDED}
    if resume and json_path.exists() and started:
        meta["started"] = started
    t0 = time.time() - sum(r.get("seconds", 0) for r in done.values() if r["name"] in names)
    rows = [done[n] for n in names if n in done]
    todo = sorted((n for n in names if n not in done and n not in EXCLUDED), key=_param_estimate)
    with ModelProgress(todo) as bar:
        for i, name in enumerate(todo):
            bar.start(name)
            row = _check_in_subprocess(name, timeout) if isolate else check_model(name)
            rows.append(row)
            log(f"[{i + 1}/{len(todo)}] {name}: {'pass' if row['passed'] else 'FAIL ' + row['reason']} "
                f"({row.get('seconds', 0):.0f}s)")
            meta["seconds"] = round(time.time() - t0, 1)
            _write(rows, names, meta, out)
            bar.finish(name)
    meta["seconds"] = round(time.time() - t0, 1)
    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    _write(rows, names, meta, out)
    return rows


def _write(rows: list[dict], names: list[str], meta: dict, out: Path) -> None:
    rows = sorted(rows, key=lambda r: r["name"])
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "models": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, names, meta))


def _worst(rows: list[dict], framework: str) -> Optional[tuple[float, str]]:
    vals = [(r2["rel"], f"{r['name']}{' (folded)' if r2['fold_bn'] else ''}")
            for r in rows for r2 in r["results"] if r2["framework"] == framework]
    return max(vals) if vals else None


def markdown(rows: list[dict], names: list[str], meta: dict) -> str:
    passed = [r for r in rows if r["passed"]]
    pending = [n for n in names if n not in {r["name"] for r in rows} and n not in EXCLUDED]
    lines = [
        "# ResNet-family coverage",
        "",
        "Every timm model whose `timm.create_model(name)` is a `timm.models.resnet.ResNet`, enumerated",
        f"from timm {meta['timm']} at run time, checked by `scripts/sweep_resnets.py`: random weights with",
        "randomised norm statistics, logits of the Haiku and Equinox ports against PyTorch's, BatchNorm",
        f"folded and not, fp32 at `highest`, batch {meta['batch']}, {meta['size'][0]}x{meta['size'][1]} input "
        f"({meta['fallback_size'][0]}x{meta['fallback_size'][1]} where timm",
        "itself cannot run that size). Pass: relative error ‖Δ‖/‖ref‖ ≤ 1e-5 and the same top-1 for every",
        "sample, in all four variants. Folding is a no-op for GroupNorm models (no running statistics).",
        "Gradients: one jitted training step (`zoo.training.make_train_step`, cross-entropy in training",
        "mode, SGD) per framework on the converted model; pass: loss, parameters and statistics finite.",
        "The random models are conditioned like trained ones (`converters.torch_models.randomize_norms`):",
        "otherwise PyTorch's own fp32 logits can be 1e-5..1e-1 from float64, and no two fp32",
        "implementations could agree to 1e-5. A failure is diagnosed by running the port in float64",
        "(jax_enable_x64, same weights, inputs, folding) against PyTorch in float64.",
        "",
        f"- enumerated: {len(names)}; checked: {len(rows)}; passed: {len(passed)}; "
        f"failed: {len(rows) - len(passed)}; not run: {len(pending)}; excluded: {len(EXCLUDED)}",
    ]
    for fw in FRAMEWORKS:
        w = _worst(rows, fw)
        if w:
            lines.append(f"- worst relative error, {fw}: {w[0]:.2e} ({w[1]})")
    if "seconds" in meta:
        lines.append(f"- sweep time: {meta['seconds'] / 60:.1f} min ({meta['platform']}); started "
                     f"{meta['started']}{', finished ' + meta['finished'] if 'finished' in meta else ' (in progress)'}")
    grads = [g for r in rows for g in r.get("gradients") or []]
    if grads:
        lines.append(f"- jitted gradients: {sum(g['finite'] for g in grads)} of {len(grads)} finite "
                     f"({len({r['name'] for r in rows if r.get('gradients')})} models x 2 frameworks)"
                     + (f", taken in {meta['gradient_seconds'] / 60:.1f} min by `--gradients-only`"
                        if "gradient_seconds" in meta else ""))
    if EXCLUDED:
        lines += ["", "Excluded:", ""] + [f"- `{n}`: {why}" for n, why in sorted(EXCLUDED.items())]
    if pending:
        lines += ["", f"Not run yet: {', '.join(pending)}"]
    lines += ["", "| model | params (M) | size | haiku | haiku folded | equinox | equinox folded | jitted grad |"
              " result |", "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        rel = {(x["framework"], x["fold_bn"]): f"{x['rel']:.2e}" for x in r["results"]}
        cells = [rel.get((fw, f), "-") for fw in FRAMEWORKS for f in (False, True)]
        size = "x".join(map(str, r["size"])) if r.get("size") else "-"
        params = f"{r['params'] / 1e6:.1f}" if r.get("params") else "-"
        grads = r.get("gradients") or []
        grad = ("-" if not grads else "finite" if all(g["finite"] for g in grads) else "NOT finite")
        if grads:
            grad += f" ({', '.join(str(g['seconds']) for g in grads)} s)"
        result = "pass" if r["passed"] else f"FAIL: {r['reason']}"
        if r.get("size_note"):
            result += f" ({r['size_note']})"
        lines.append(f"| {r['name']} | {params} | {size} | " + " | ".join(cells) + f" | {grad} | {result} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["*"], help="Glob patterns over timm's ResNet names.")
    ap.add_argument("--out", default="docs/coverage", help="Writes OUT.md and OUT.json.")
    ap.add_argument("--timeout", type=float, default=3600, help="Seconds per model.")
    ap.add_argument("--resume", action="store_true", help="Skip models already in OUT.json.")
    ap.add_argument("--rerun-failed", action="store_true", help="With --resume, check failed models again.")
    ap.add_argument("--no-isolate", action="store_true", help="Run every model in this process.")
    ap.add_argument("--gradients-only", action="store_true",
                    help="Keep OUT.json's parity results; (re)take each model's jitted gradients.")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: check one model, print its JSON
    ap.add_argument("--one-gradients", help=argparse.SUPPRESS)  # internal: gradients of one model
    args = ap.parse_args()
    if args.one or args.one_gradients:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
        print(json.dumps(check_model(args.one) if args.one else check_gradients(args.one_gradients)))
        return
    if args.gradients_only:
        out = Path(args.out)
        add_gradients(out if out.is_absolute() else ROOT / out, args.models, args.timeout)
        return
    t = time.time()
    names = timm_resnet_names()
    print(f"{len(names)} timm ResNet models (enumerated in {time.time() - t:.0f}s)", flush=True)
    names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in args.models)]
    out = Path(args.out)
    rows = run_sweep(names, out if out.is_absolute() else ROOT / out, isolate=not args.no_isolate,
                     timeout=args.timeout, resume=args.resume, rerun_failed=args.rerun_failed,
                     log=lambda s: print(s, flush=True))
    print(f"{sum(r['passed'] for r in rows)}/{len(rows)} passed; wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
