"""Charts for the docs, drawn from the committed JSON results only (nothing is measured here).

    python scripts/make_charts.py               # writes docs/charts/*.png
    python scripts/make_charts.py --out /tmp/charts

- parity.png: ‖Δ‖/‖ref‖ against PyTorch for every model of docs/coverage.json (the timm ResNet
  sweep) and GoogLeNet from docs/parity_table.json, per framework, BatchNorm folded and not.
- finetune.png: the fine-tuning runs of docs/finetune_*.json (loss per step, loss and accuracy
  per epoch).
- throughput_<name>.png: images/s of benchmarks/results/inference_*.json and training_*.json, with
  the PyTorch reference marked.
- bench_<stem>.png: benchmarks/results/bench_*.json (`zoo bench` output), drawn by
  `zoo._bench.chart` where that exists.

Output is byte-for-byte reproducible: fixed sizes and dpi, matplotlib's built-in style (not the
user's matplotlibrc) and no version string in the PNG metadata.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

try:
    import matplotlib
except ImportError:  # the docs extra is optional; say how to get it instead of a traceback
    sys.exit("make_charts needs matplotlib: pip install -e '.[docs]'")

matplotlib.use("Agg")
import matplotlib.style  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
DPI = 100
# "Software" carries the matplotlib version: without it, the same data gives the same bytes
# whichever matplotlib drew it (as far as its rendering allows).
PNG_METADATA = {"Software": None}
TOLERANCE = 1e-5
FRAMEWORK_COLORS = {"haiku": "tab:blue", "equinox": "tab:orange", "pytorch": "tab:gray"}
# (framework, fold_bn) -> (label, marker, filled). Folded hollow, so that where the four points
# coincide (they mostly do) each stays visible.
VARIANTS = {
    ("haiku", False): ("Haiku", "o", True),
    ("haiku", True): ("Haiku, BN folded", "o", False),
    ("equinox", False): ("Equinox", "s", True),
    ("equinox", True): ("Equinox, BN folded", "s", False),
}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    return path


def _color(framework: str) -> str:
    return FRAMEWORK_COLORS.get(framework.lower(), "tab:green")


# ---------------------------------------------------------------------------------------------
# Parity


def parity_data(coverage: dict, parity_table: Optional[dict] = None) -> dict[str, Any]:
    """Rows to plot: `{"models": [label, ...], "rel": {(framework, fold_bn): [rel, ...]}}`,
    ordered by each model's worst variant, worst first. A label is the model's name, with its size
    where that is not the sweep's. GoogLeNet (torchvision, not part of the timm sweep) comes from
    the parity table, one row per input size it was measured at."""
    sweep_size = coverage.get("meta", {}).get("size")
    per_model: dict[str, dict[tuple[str, bool], float]] = {}
    for row in coverage["models"]:
        size = row.get("size")
        label = row["name"] if not size or size == sweep_size else f"{row['name']} {size[0]}x{size[1]}"
        per_model[label] = {(r["framework"], bool(r["fold_bn"])): float(r["rel"]) for r in row["results"]}
    for r in (parity_table or {}).get("rows", []):
        if r["model"] == "googlenet":
            label = f"googlenet (torchvision) {r['size'][0]}x{r['size'][1]}"
            per_model.setdefault(label, {})[(r["framework"], bool(r["fold_bn"]))] = float(r["rel"])
    # The name breaks ties so that the order (and the PNG) depends on the data only.
    models = sorted(per_model, key=lambda m: (-max(per_model[m].values(), default=0.0), m))
    rel = {v: [per_model[m].get(v, math.nan) for m in models] for v in VARIANTS}
    return {"models": models, "rel": rel}


def parity_chart(coverage: dict, parity_table: Optional[dict], path: Path) -> dict[str, Any]:
    """Writes `parity_figure`; returns what it plotted (`parity_data`)."""
    data = parity_data(coverage, parity_table)
    _save(parity_figure(data, coverage.get("meta", {}), len(coverage["models"])), path)
    return data


def parity_figure(data: dict[str, Any], meta: dict, n_sweep: int) -> Figure:
    """‖Δ‖/‖ref‖ per model, one marker per framework and folding, on a log axis, against the
    1e-5 bar."""
    models = data["models"]
    n = len(models)
    # Tall and horizontal so that 100+ names stay legible; the worst model at the top.
    fig = Figure(figsize=(8.0, 1.6 + 0.16 * n))
    ax = fig.add_subplot()
    ys = list(range(n))
    for variant, (label, marker, filled) in VARIANTS.items():
        color = _color(variant[0])
        ax.plot(data["rel"][variant], ys, linestyle="none", marker=marker, markersize=4.5, label=label,
                color=color, markerfacecolor=color if filled else "none", markeredgewidth=1.0, alpha=0.85)
    ax.axvline(TOLERANCE, color="tab:red", linestyle="--", linewidth=1.2, label="bar: 1e-5")
    ax.set_xscale("log")
    finite = [v for vals in data["rel"].values() for v in vals if math.isfinite(v) and v > 0]
    lo, hi = min(finite + [TOLERANCE]), max(finite + [TOLERANCE])
    # Wide enough for a failing model (past sweeps had 1e-1): a point off the axis would hide it.
    ax.set_xlim(10 ** math.floor(math.log10(lo)), 10 ** (math.log10(hi) + 0.5))
    # A model that produced no numbers (crashed, timed out) keeps its row, saying so.
    empty = {m for i, m in enumerate(models) if all(math.isnan(data["rel"][v][i]) for v in VARIANTS)}
    ax.set_yticks(ys, [m + "  (no result)" if m in empty else m for m in models], fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)
    ax.grid(axis="x", which="both", linewidth=0.4, alpha=0.5)
    ax.grid(axis="y", linewidth=0.3, alpha=0.3)
    ax.set_xlabel("‖Δ‖ / ‖ref‖ against PyTorch fp32 logits (log scale; pass: ≤ 1e-5)")
    size = meta.get("size", ["?", "?"])
    googlenet = " + GoogLeNet" if any(m.startswith("googlenet (torchvision)") for m in models) else ""
    ax.set_title(f"Parity with PyTorch: {n_sweep} timm ResNet-family models "
                 f"(timm {meta.get('timm', '?')}){googlenet}\n"
                 f"random weights, batch {meta.get('batch', '?')}, {size[0]}x{size[1]} input "
                 f"unless the name gives a size, fp32 at 'highest'", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Fine-tuning

_FRAMEWORK_ORDER = {"pytorch": 0, "haiku": 1, "equinox": 2}


def finetune_chart(runs: Sequence[dict], path: Path) -> dict[str, Any]:
    """Writes `finetune_figure`; returns what it plotted: `{framework: {"steps", "epochs"}}`."""
    fig, plotted = finetune_figure(runs)
    _save(fig, path)
    return plotted


def finetune_figure(runs: Sequence[dict]) -> tuple[Figure, dict[str, Any]]:
    """Training loss per step, and train/test loss and accuracy per epoch, one colour per
    framework (any finetune_*.json is drawn, so a PyTorch run appears once one is recorded)."""
    runs = sorted(runs, key=lambda r: (_FRAMEWORK_ORDER.get(r["framework"].lower(), 9), r["framework"]))
    fig = Figure(figsize=(13.0, 4.2))
    ax_step, ax_loss, ax_acc = fig.subplots(1, 3)
    plotted: dict[str, Any] = {}
    for run in runs:
        fw, color = run["framework"], _color(run["framework"])
        steps = [float(v) for v in run.get("steps", [])]
        epochs = run.get("epochs", [])
        ep = [e["epoch"] for e in epochs]
        if steps:
            ax_step.plot(range(1, len(steps) + 1), steps, color=color, linewidth=1.0, label=fw)
        for key, ax, style in (("train_loss", ax_loss, "-"), ("test_loss", ax_loss, "--"),
                               ("train_accuracy", ax_acc, "-"), ("test_accuracy", ax_acc, "--")):
            vals = [e.get(key) for e in epochs]
            if vals and all(v is not None for v in vals):
                ax.plot(ep, vals, style, marker="o", markersize=3, color=color,
                        label=f"{fw} {key.split('_')[0]}")
        plotted[fw] = {"steps": steps, "epochs": epochs}
    arch = ", ".join(sorted({r.get("arch", "?") for r in runs}))
    ax_step.set(title="training loss per step", xlabel="step", ylabel="cross-entropy")
    ax_loss.set(title="loss per epoch (dashed: test)", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="accuracy per epoch (dashed: test)", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    for ax in (ax_step, ax_loss, ax_acc):
        ax.grid(linewidth=0.4, alpha=0.5)
        ax.legend(fontsize=8)
    fig.suptitle(f"Fine-tuning {arch} (docs/finetune_*.json)", fontsize=11)
    fig.tight_layout()
    return fig, plotted


# ---------------------------------------------------------------------------------------------
# Throughput


def throughput_rows(result: dict) -> Optional[dict[str, Any]]:
    """The older benchmark files in one shape: `{"title", "rows": [(impl, images/s, ratio)],
    "reference": impl}`; None if the file is neither schema. `ratio` is the file's own speed
    relative to its PyTorch reference (the row whose ratio is 1)."""
    if isinstance(result.get("results"), list) and "env" in result:  # benchmarks/bench_inference.py
        env = result["env"]
        rows = [(r["impl"], float(r["images_per_s"]), float(r["speed_vs_pytorch_nchw"])) for r in result["results"]]
        title = (f"Inference, {env.get('arch', '?')}, batch {env.get('batch', '?')}, {env.get('size', '?')}px, "
                 f"{env.get('dtype', '')}, {env.get('jax_device', '?')} ({env.get('torch_threads', '?')} threads)")
    elif isinstance(result.get("rows"), list) and "config" in result:  # benchmarks/bench_training.py
        cfg = result["config"]
        # The config lists the archs asked for; only the rows say which ones ran.
        several = len({r["arch"] for r in result["rows"]}) > 1
        rows = [(f"{r['arch']}: {r['impl']}" if several else r["impl"],
                 float(r["images_per_s"]), float(r["vs_torch_eager"])) for r in result["rows"]]
        archs = ", ".join(sorted({r["arch"] for r in result["rows"]}))
        title = (f"Training step, {archs}, batch {cfg.get('batch', '?')}, {cfg.get('size', '?')}px, "
                 f"{result.get('device_name') or result.get('torch_device', '?')}")
    else:
        return None
    refs = [impl for impl, _, ratio in rows if ratio == 1.0 and impl.lower().split(": ")[-1].startswith("pytorch")]
    return {"title": title, "rows": rows, "reference": refs[0] if refs else None}


def throughput_chart(result: dict, path: Path) -> Optional[dict[str, Any]]:
    """Writes `throughput_figure`; returns what it plotted (`throughput_rows`), None (and writes
    nothing) for a file of another schema."""
    data = throughput_rows(result)
    if data is None:
        return None
    _save(throughput_figure(data), path)
    return data


def throughput_figure(data: dict[str, Any]) -> Figure:
    """Images/s bars, PyTorch grey and zoo in colour, the reference outlined and dashed, each bar
    labelled with its speed relative to it."""
    rows = data["rows"]
    fig = Figure(figsize=(10.0, 1.4 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    ys = list(range(len(rows)))
    colors = []
    for impl, _, _ in rows:
        low = impl.lower().split(": ")[-1]
        colors.append(_color("pytorch") if low.startswith("pytorch") else
                      _color("haiku") if "haiku" in low else _color("equinox") if "equinox" in low else "tab:green")
    ref = data["reference"]
    ax.barh(ys, [v for _, v, _ in rows], color=colors, height=0.6,
            edgecolor=["black" if impl == ref else "none" for impl, _, _ in rows], linewidth=1.2)
    top = max(v for _, v, _ in rows)
    for y, (_, v, ratio) in zip(ys, rows):
        # Backed in white: the reference line runs through the labels of slower bars.
        ax.text(v + top * 0.01, y, f"{v:,.1f} img/s  ({ratio:.2f}x)", va="center", fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0})
    if ref is not None:
        ref_v = next(v for impl, v, _ in rows if impl == ref)
        ax.axvline(ref_v, color="black", linestyle="--", linewidth=1.0)
    ax.set_yticks(ys, [impl + ("  [reference]" if impl == ref else "") for impl, _, _ in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, top * 1.3)
    ax.set_xlabel("images/s from the median time, higher is better; (Nx): relative to the [reference], dashed",
                  fontsize=9)
    ax.set_title(data["title"], fontsize=10)
    ax.grid(axis="x", linewidth=0.4, alpha=0.5)
    fig.tight_layout()
    return fig


def _bench_chart():
    """`zoo._bench.chart`, or None with the reason (it is written separately and may not exist)."""
    try:
        module = importlib.import_module("zoo._bench")
    except ImportError as e:
        return None, f"zoo._bench is not importable ({e})"
    chart = getattr(module, "chart", None)
    if not callable(chart):
        return None, "zoo._bench has no chart()"
    return chart, ""


# ---------------------------------------------------------------------------------------------


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def make_charts(out: Path, *, docs: Path = DOCS, results: Path = RESULTS, log=print) -> list[Path]:
    """Every chart whose inputs exist; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def wrote(path: Path) -> None:
        written.append(path)
        log(f"wrote {path}")

    if (docs / "coverage.json").exists():
        table = _load(docs / "parity_table.json") if (docs / "parity_table.json").exists() else None
        parity_chart(_load(docs / "coverage.json"), table, out / "parity.png")
        wrote(out / "parity.png")
    else:
        log(f"skipped parity.png: no {docs / 'coverage.json'}")

    runs = [_load(p) for p in sorted(docs.glob("finetune_*.json"))]
    if runs:
        finetune_chart(runs, out / "finetune.png")
        wrote(out / "finetune.png")
    else:
        log(f"skipped finetune.png: no {docs}/finetune_*.json")

    for p in sorted(results.glob("inference_*.json")) + sorted(results.glob("training_*.json")):
        target = out / f"throughput_{p.stem}.png"
        if throughput_chart(_load(p), target) is None:
            log(f"skipped {p.name}: not a bench_inference/bench_training result")
        else:
            wrote(target)

    bench_files = sorted(results.glob("bench_*.json"))
    if bench_files:
        chart, why = _bench_chart()
        if chart is None:
            log(f"skipped {len(bench_files)} bench_*.json: {why}")
        else:
            for p in bench_files:
                target = out / f"bench_{p.stem.removeprefix('bench_')}.png"
                chart(_load(p), target)
                wrote(target)
    return written


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DOCS / "charts"), help="Folder for the PNGs (default docs/charts).")
    args = ap.parse_args(argv)
    # The built-in style, not the user's matplotlibrc: the same JSON gives the same PNGs anywhere.
    with matplotlib.style.context("default"):
        return make_charts(Path(args.out))


if __name__ == "__main__":
    main()
