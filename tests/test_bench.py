"""`zoo bench` and zoo._bench: what it runs, what it writes. The timings themselves are not
checked (one call each on a shared machine); their bookkeeping is."""

import json
import os
import statistics
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli import app
from zoo import _bench

runner = CliRunner()
ARCH = "test_resnet"  # a 1.9 MB ResNet: the cheapest model both libraries have
CHEAP = ["--batch", "2", "--repeats", "1", "--warmup", "0"]
NO_COMPILE = [n for n in _bench.IMPLS if n != "torch-compile-cl"]  # torch.compile: ~30 s of compiling on CPU
META_FIELDS = {"schema", "arch", "modes", "impls", "batch", "size", "dtype", "device", "jax_device", "torch_device",
               "device_name", "repeats", "warmup", "cpu", "versions", "precision", "jax_compilation_cache", "xla_flags",
               "zoo_env", "train", "platform", "started"}


def _bench_cli(*args):
    result = runner.invoke(app, ["bench", ARCH, *args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def both_modes(tmp_path_factory):
    """One run of every implementation but torch.compile, inference and training."""
    out = tmp_path_factory.mktemp("bench")
    result = _bench_cli("--mode", "both", *CHEAP, "--size", "32", "--impl", *NO_COMPILE,
                        "--json", str(out / "r.json"), "--chart", str(out / "r.png"))
    return result, json.loads((out / "r.json").read_text()), out


def _check_rows(results, batch):
    for r in results["rows"]:
        assert set(r) == set(_bench.ROW_FIELDS), r["impl"]
        assert r["error"] is None, r["error"]
        assert len(r["times_s"]) == results["meta"]["repeats"]
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["images_per_s"] == pytest.approx(batch / r["median_s"])
        assert r["first_call_s"] > 0
        assert r["label"] == _bench.IMPLS[r["impl"]].label and r["framework"] == _bench.IMPLS[r["impl"]].framework
        for key, baseline in (("vs_torch_compile", "torch-compile-cl"), ("vs_torch_eager_nchw", "torch-eager-nchw")):
            base = [b for b in results["rows"] if b["mode"] == r["mode"] and b["impl"] == baseline]
            if base:
                assert r[key] == pytest.approx(base[0]["median_s"] / r["median_s"])
            else:
                assert r[key] is None


def test_both_modes_json(both_modes):
    _, results, _ = both_modes
    assert set(results) == {"meta", "rows"}
    meta = results["meta"]
    assert META_FIELDS <= set(meta)
    assert meta["arch"] == ARCH and meta["batch"] == 2 and meta["size"] == [32, 32] and meta["dtype"] == "float32"
    assert meta["modes"] == ["inference", "train"] and meta["impls"] == NO_COMPILE
    assert {"jax", "jaxlib", "torch", "timm", "equinox", "dm-haiku", "optax"} <= set(meta["versions"])
    assert all(meta["versions"][k] for k in ("jax", "torch", "equinox", "dm-haiku", "optax"))
    assert meta["cpu"]["torch_threads"] >= 1 and meta["device_name"]
    assert meta["xla_flags"] == os.environ.get("XLA_FLAGS")  # flags change kernels and compile times
    # zoo's own switches (ZOO_BN_GRAD, ZOO_CONV_AS_DOT) change the programs too
    assert meta["zoo_env"] == {k: v for k, v in os.environ.items() if k.startswith("ZOO_")}
    # Inference runs every selected implementation, training all but the BN-folded ones, and the
    # rows come in mode order, then IMPLS order.
    assert [(r["mode"], r["impl"]) for r in results["rows"]] == (
        [("inference", n) for n in NO_COMPILE] + [("train", n) for n in NO_COMPILE if "folded" not in n])
    _check_rows(results, batch=2)
    nchw = [r for r in results["rows"] if r["impl"] == "torch-eager-nchw"]
    assert all(r["vs_torch_eager_nchw"] == pytest.approx(1.0) for r in nchw)


def test_both_modes_table(both_modes):
    result, _, _ = both_modes
    # Words, not lines: rich wraps a title wider than its table ("training" / "step" on an Intel
    # Xeon, whose CPU name is in the title).
    words = " ".join(result.output.split())
    for text in ("inference", "training step", "zoo-equinox-folded", "torch-eager-cl", "median ms", "vs compile",
                 "wrote"):
        assert text in words


def test_chart(both_modes, tmp_path):
    _, results, out = both_modes
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What a docs script does with saved JSON; the same JSON gives the same bytes.
    again = _bench.chart(results, tmp_path / "again.png")
    assert again.read_bytes() == _bench.chart(results, tmp_path / "twice.png").read_bytes()


def test_failed_torch_compile_is_a_row(monkeypatch, tmp_path):
    """torch-compile-cl is selectable, and when torch.compile fails (no compiler, say) its row
    says why and the run goes on; nothing takes a ratio to it."""
    import torch

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(torch, "compile", no_compiler)
    result = _bench_cli("--mode", "inference", *CHEAP, "--size", "40", "48", "--impl", "torch-compile-cl",
                        "--impl", "torch-eager-nchw", "--json", str(tmp_path / "r.json"),
                        "--chart", str(tmp_path / "r.png"))
    assert "failed: RuntimeError: no C++ compiler" in result.output
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["meta"]["size"] == [40, 48]
    eager, compiled = results["rows"]
    assert (eager["impl"], compiled["impl"]) == ("torch-eager-nchw", "torch-compile-cl")
    assert compiled["error"].startswith("RuntimeError: no C++ compiler")
    assert compiled["median_s"] is None and compiled["times_s"] == [] and compiled["vs_torch_eager_nchw"] is None
    assert eager["error"] is None and eager["vs_torch_compile"] is None and eager["images_per_s"] > 0
    assert (tmp_path / "r.png").exists()


@pytest.mark.slow
def test_torch_compile(tmp_path):
    _bench_cli("--mode", "both", *CHEAP, "--size", "32", "--impl", "torch-compile-cl,torch-eager-cl",
                        "--impl", "zoo-haiku", "--json", str(tmp_path / "r.json"))
    results = json.loads((tmp_path / "r.json").read_text())
    assert [(r["mode"], r["impl"]) for r in results["rows"]] == [
        (m, n) for m in ("inference", "train") for n in ("torch-eager-cl", "torch-compile-cl", "zoo-haiku")]
    _check_rows(results, batch=2)
    assert all(r["vs_torch_compile"] == pytest.approx(1.0) for r in results["rows"] if r["impl"] == "torch-compile-cl")


@pytest.mark.parametrize("args,message", [
    (["--impl", "zoo-jax"], "unknown implementation 'zoo-jax'"),
    (["--mode", "train", "--impl", "zoo-haiku-folded"], "inference-only"),
    (["--mode", "eval"], "--mode 'eval'"),
    (["--dtype", "float16"], "--dtype 'float16'"),
    (["--size", "32", "24", "16"], "at most one width"),
    (["7"], "unexpected argument '7'"),
    (["zoo-haiku"], "unexpected argument 'zoo-haiku'"),
])
def test_bad_arguments(args, message):
    result = runner.invoke(app, ["bench", ARCH, *args])
    assert result.exit_code == 1 and message in result.output, result.output


def test_unknown_model_and_unwritable_output(tmp_path):
    result = runner.invoke(app, ["bench", "resent18"])
    assert result.exit_code == 1 and "did you mean" in result.output
    result = runner.invoke(app, ["bench", ARCH, "--json", str(tmp_path / "missing" / "r.json")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_chart_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = runner.invoke(app, ["bench", ARCH, "--chart", str(tmp_path / "r.png")])
    assert result.exit_code == 1 and "pip install matplotlib" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_import_is_light():
    code = ("import sys, zoo._bench; heavy = {'torch', 'jax', 'timm', 'matplotlib'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_select_impls():
    assert _bench.select_impls(None) == list(_bench.IMPLS)
    assert _bench.select_impls(["zoo-equinox,torch-compile-cl", "zoo-equinox"]) == ["torch-compile-cl", "zoo-equinox"]
    # torch.compile runs last (its compile is the longest, a time limit should cut it first)
    assert _bench.impls_for("inference", list(_bench.IMPLS))[-1] == "torch-compile-cl"
    assert "zoo-haiku-folded" not in _bench.impls_for("train", list(_bench.IMPLS))


def test_layer_benchmark_times_every_layer_of_the_model(tmp_path):
    """benchmarks/bench_cpu_layers.py: its layers are the PyTorch model's own (every Conv2d and
    MaxPool2d call, identical ones counted), each checked equal in XLA and PyTorch before timing."""
    import importlib.util

    import torch

    from converters.torch_models import random_model

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "bench_cpu_layers.py")
    out = tmp_path / "layers.json"
    subprocess.run([sys.executable, script, ARCH, "--batch", "1", "--size", "33", "--repeats", "1", "--rounds", "1",
                    "--out", str(out)], check=True, cwd=root, capture_output=True)
    (res,) = json.loads(out.read_text())["results"]

    calls = {"conv": 0, "max_pool": 0}
    model = random_model(ARCH).eval()

    def count(mod, inp, outp):
        calls["conv" if isinstance(mod, torch.nn.Conv2d) else "max_pool"] += 1

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            m.register_forward_hook(count)
    with torch.inference_mode():
        model(torch.zeros(1, 3, 33, 33))
    for kind in calls:
        assert sum(r["count"] for r in res["layers"] if r["kind"] == kind) == calls[kind] > 0
    names = [r["name"] for r in res["layers"]]
    assert len(names) == len(set(names)) and names[0] == "conv 3x3/2 3>16 @33x33"  # the stem, first
    for r in res["layers"]:
        # Convolutions wider than 1x1 are timed as im2col + dot too (test_resnet: no groups).
        wide = r["kind"] == "conv" and not r["name"].startswith("conv 1x1")
        assert set(r["ms"]) == {"zoo", "JAX default", "PyTorch cl"} | ({"im2col"} if wide else set())
        assert all(v > 0 for v in r["ms"].values())
    assert res["totals_ms"]["conv wider than 1x1"]["im2col"] > 0
    assert res["model_ms"]["zoo Haiku"] > 0 and res["model_ms"]["PyTorch cl"] > 0

    # The check that makes the comparison meaningful: a layer computed differently fails the run.
    spec = importlib.util.spec_from_file_location("bench_cpu_layers", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import numpy as np

    layer = {"key": ("conv", (1, 4, 9, 9), 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, False), "count": 1}
    assert bench.time_layer(dict(layer), 1, np.random.default_rng(0))["count"] == 1
    wrong = torch.nn.functional.conv2d
    try:
        torch.nn.functional.conv2d = lambda x, w, b=None, **kw: wrong(x, w, b, **kw) + 1
        with pytest.raises(AssertionError, match="XLA and PyTorch differ"):
            bench.time_layer(dict(layer), 1, np.random.default_rng(0))
    finally:
        torch.nn.functional.conv2d = wrong
    im2col = bench.im2col_conv2d
    try:
        bench.im2col_conv2d = lambda x, w, stride, padding: im2col(x, w, stride, padding)[:, ::-1]
        with pytest.raises(AssertionError, match="im2col and PyTorch differ"):
            bench.time_layer(dict(layer), 1, np.random.default_rng(0))
    finally:
        bench.im2col_conv2d = im2col


def test_ynn_option_benchmark_times_each_variant_on_the_same_logits(tmp_path):
    """benchmarks/bench_cpu_ynn.py: every YNNPACK option list compiles and times the same predict
    in one process, and the variants' logits agree (they differ only in which library computes)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "ynn.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_cpu_ynn.py"), "--archs", ARCH,
                    "--batches", "1", "2", "--size", "33", "--calls", "2", "--blocks", "2",
                    "--variants", "dots+reductions", "dots", "none", "--out", str(out)],
                   check=True, cwd=root, capture_output=True, env=env)
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["arch"] == ARCH and result["config"]["variants"] == ["dots+reductions", "dots", "none"]
    for b in (1, 2):
        assert set(row[f"batch{b}_ms"]) == {"dots+reductions", "dots", "none"}
        assert all(v > 0 for v in row[f"batch{b}_ms"].values())
        assert row[f"batch{b}_rel_to_first"]["dots+reductions"] == 0
        assert all(v < 1e-5 for v in row[f"batch{b}_rel_to_first"].values())


def test_relu_form_benchmark_times_both_forms_and_checks_the_nan_loss(tmp_path):
    """benchmarks/bench_cpu_relu.py: the predict and a training step compiled with ReLU as a
    maximum and as a select in one process, each timed; the same logits (ReLU is exact either
    way), and zoo's form gives a NaN loss for a batch holding a NaN pixel."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "relu.json"
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_cpu_relu.py"), "--archs", ARCH,
                    "--frameworks", "haiku", "equinox", "--batch", "2", "--size", "33", "--train-batch", "2",
                    "--train-size", "35", "--calls", "2", "--blocks", "2", "--out", str(out)],
                   check=True, cwd=root, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["arch"], r["framework"]) for r in rows] == [(ARCH, "haiku"), (ARCH, "equinox")]
    for r in rows:
        for key in ("predict_ms", "train_ms"):
            assert set(r[key]) == {"maximum", "select"} and all(v > 0 for v in r[key].values())
        assert r["predict_max_abs_diff"] == 0
        assert r["nan_pixel_gives_nan_loss"]["select"] is True


def test_bn_grad_benchmark_times_both_derivatives_in_one_process(tmp_path):
    """benchmarks/bench_bn_grad.py (`STAGES=bngrad` of scripts/gpu_perf_run.sh), in both
    frameworks: both train steps timed, only the second traced through the closed form, and their first losses (the same forward) equal to rounding."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bn_grad.json"
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_bn_grad.py"), "--archs", ARCH,
                    "--sizes", "33", "--batch", "2", "--rounds", "2", "--out", str(out)],
                   check=True, cwd=root, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["arch"], r["framework"], r["size"]) for r in rows] == [(ARCH, "haiku", 33), (ARCH, "equinox", 33)]
    for r in rows:
        assert [r[m]["closed_form_traced"] for m in ("autodiff", "closed")] == [False, True]
        assert all(len(r[m]["times_s"]) == 2 and r[m]["median_s"] > 0 for m in ("autodiff", "closed"))
        assert r["closed"]["first_loss"] == pytest.approx(r["autodiff"]["first_loss"], rel=1e-5)


def test_narrow_conv_benchmark_times_each_form_and_records_the_rule(tmp_path, monkeypatch):
    """benchmarks/bench_cpu_narrow_convs.py: each case timed as XLA's convolution (two option
    sets), as zoo's im2col (one group only) and in PyTorch, each XLA form checked against
    PyTorch's values first, and beside it what `ops.runs_as_im2col` decides."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(root, "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_cpu_narrow_convs",
                                                  os.path.join(root, "benchmarks", "bench_cpu_narrow_convs.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "CASES", [(2, 2, 2, 4, 4, 3, 1, 1, 1), (2, 5, 6, 4, 6, 3, 2, 1, 1),
                                         (2, 2, 2, 4, 4, 3, 1, 1, 2)])
    out = tmp_path / "narrow.json"
    monkeypatch.setattr(sys, "argv", ["bench", "--repeats", "1", "--out", str(out)])
    bench.main()
    rows = json.loads(out.read_text())["rows"]
    assert [r["rule"] for r in rows] == [True, False, False]
    assert rows[1]["case"] == "3x3/2 4>6 @5x6->3x3, batch 2"
    forms = ["conv, JAX default", "conv, zoo inference", "im2col", "PyTorch cl"]
    for r, expected in zip(rows, (forms, forms, [f for f in forms if f != "im2col"])):
        assert set(r["ms"]) == {f"{f} / {part}" for f in expected for part in ("forward", "input grad")}
        assert all(v > 0 for v in r["ms"].values())

    import jax

    from zoo import ops

    def wrong(x, w, stride, padding, dilation, dims):  # the convolution, off by one
        return jax.lax.conv_general_dilated(x, w, (stride,) * 2, ((padding, padding),) * 2,
                                            rhs_dilation=(dilation,) * 2, dimension_numbers=dims) + 1

    monkeypatch.setattr(ops, "_im2col_dot", wrong)
    monkeypatch.setattr(bench, "CASES", [(2, 2, 2, 4, 4, 3, 1, 1, 1)])
    with pytest.raises(AssertionError, match="im2col and PyTorch differ"):
        bench.main()


def test_kernel_profile_reads_xla_thunks_on_a_cpu(tmp_path):
    """`benchmarks/profile_gpu.py` on a CPU: each zoo row's time and its XLA thunks by name (the
    events JAX's profiler records per HLO op on the host's threads), grouped; a CPU has no device
    streams, and without the host's thunks the profile was empty."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "profile_gpu.py"), ARCH, "--impl", "zoo-equinox",
                    "--mode", "train", "--device", "cpu", "--dtype", "float32", "--batch", "2", "--size", "33",
                    "--repeats", "1", "--warmup", "0", "--calls", "1", "--out", str(out)], check=True, cwd=root,
                   capture_output=True, timeout=600)
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row["error"]
    assert row["impl"] == "zoo-equinox" and row["median_ms"] > 0 and row["kernels_per_call"] >= 10
    assert row["kernel_ms_per_call"] == pytest.approx(sum(row["groups_ms_per_call"].values()))
    assert row["groups_ms_per_call"]["library"] > 0  # YNNPACK's fusions
    assert all(not t["name"].startswith(("$", "end: ", "ThunkExecutor")) for t in row["top"])
