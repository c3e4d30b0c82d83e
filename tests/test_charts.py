"""scripts/make_charts.py: the docs charts are drawn from the committed JSON, and draw what it says."""

import json
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from tests.conftest import load_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def charts():
    import matplotlib.style

    mc = load_script("make_charts")
    with matplotlib.style.context("default"):
        yield mc


def _json(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def test_main_writes_valid_reproducible_pngs(charts, tmp_path):
    written = charts.main(["--out", str(tmp_path / "a")])
    names = {p.name for p in written}
    expected = {"parity.png", "finetune.png"} | {
        f"throughput_{p.stem}.png" for pattern in ("inference_*.json", "training_*.json")
        for p in (ROOT / "benchmarks" / "results").glob(pattern)}
    assert expected <= names
    for p in written:
        assert p.read_bytes()[:8] == PNG_MAGIC, p
    # Re-running must not churn the committed PNGs: same JSON, same bytes (the largest one).
    again = tmp_path / "parity_again.png"
    charts.parity_chart(_json("docs/coverage.json"), _json("docs/parity_table.json"), again)
    assert again.read_bytes() == (tmp_path / "a" / "parity.png").read_bytes()


def test_parity_chart_plots_the_json(charts):
    coverage, table = _json("docs/coverage.json"), _json("docs/parity_table.json")
    expected = {(r["name"], x["framework"], x["fold_bn"]): x["rel"] for r in coverage["models"] for x in r["results"]}
    for r in table["rows"]:
        if r["model"] == "googlenet":
            expected[(f"googlenet@{r['size'][0]}x{r['size'][1]}", r["framework"], r["fold_bn"])] = r["rel"]

    fig = charts.parity_figure(charts.parity_data(coverage, table), coverage["meta"], len(coverage["models"]))
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    ticks = list(ax.get_yticks())
    # Labels are names, "name WxH" off the sweep's size, "googlenet (torchvision) WxH".
    keys = [f"googlenet@{lab.split()[-1]}" if lab.startswith("googlenet") else lab.split()[0] for lab in labels]
    assert sorted(keys) == sorted({k[0] for k in expected})
    assert len(keys) == len(coverage["models"]) + 2
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for (fw, fold), (label, _, _) in charts.VARIANTS.items():
        xs, ys = lines[label].get_xdata(), lines[label].get_ydata()
        assert len(xs) == len(keys)
        for x, y in zip(xs, ys):
            assert x == expected[(keys[ticks.index(y)], fw, fold)]
    bar = lines["bar: 1e-5"]
    assert list(bar.get_xdata()) == [1e-5, 1e-5]
    # Worst model on top.
    worst = [max(expected[(k, fw, fold)] for fw, fold in charts.VARIANTS) for k in keys]
    assert worst == sorted(worst, reverse=True)
    assert ax.get_xscale() == "log"


def test_finetune_chart_plots_the_json(charts):
    runs = [_json("docs/finetune_haiku.json"), _json("docs/finetune_equinox.json")]
    fig, _ = charts.finetune_figure(runs)
    ax_step, ax_loss, ax_acc = fig.axes[:3]
    steps = {ln.get_label(): list(ln.get_ydata()) for ln in ax_step.get_lines()}
    acc = {ln.get_label(): list(ln.get_ydata()) for ln in ax_acc.get_lines()}
    for run in runs:
        fw = run["framework"]
        assert steps[fw] == run["steps"]
        assert acc[f"{fw} test"] == [e["test_accuracy"] for e in run["epochs"]]
        assert acc[f"{fw} train"] == [e["train_accuracy"] for e in run["epochs"]]


def test_throughput_chart_plots_the_json(charts):
    result = _json("benchmarks/results/training_gpu_h200_resnet50.json")
    data = charts.throughput_rows(result)
    assert data["reference"] == "PyTorch eager channels_last, autocast bf16"
    ax = charts.throughput_figure(data).axes[0]
    assert [p.get_width() for p in ax.patches] == [r["images_per_s"] for r in result["rows"]]
    (ref_line,) = ax.get_lines()
    assert list(ref_line.get_xdata()) == [result["rows"][0]["images_per_s"]] * 2
    assert charts.throughput_rows({"meta": {}, "rows": []}) is None  # `zoo bench` output: not this chart


def test_bench_files_go_to_zoo_bench_chart(charts, tmp_path, monkeypatch):
    results, docs, out = tmp_path / "results", tmp_path / "docs", tmp_path / "out"
    results.mkdir()
    docs.mkdir()
    (results / "bench_cpu.json").write_text(json.dumps({"meta": {"x": 1}, "rows": [{"y": 2}]}))
    calls = []
    fake = types.ModuleType("zoo._bench")
    fake.chart = lambda results, path: (calls.append((results, path)), Path(path).write_bytes(PNG_MAGIC))
    monkeypatch.setitem(sys.modules, "zoo._bench", fake)
    log = []
    assert charts.make_charts(out, docs=docs, results=results, log=log.append) == [out / "bench_cpu.png"]
    assert calls == [({"meta": {"x": 1}, "rows": [{"y": 2}]}, out / "bench_cpu.png")]

    del fake.chart
    log.clear()
    assert charts.make_charts(out, docs=docs, results=results, log=log.append) == []
    assert any("bench_*.json" in line and "no chart()" in line for line in log)
