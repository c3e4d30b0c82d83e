"""The `zoo` command line: list, convert, verify, inspect."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional, Tuple

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="PyTorch CNNs (timm / torchvision) as dm-haiku and Equinox models, converted exactly.",
                  epilog="Compiled programs are kept in JAX's persistent compilation cache, "
                         "$XDG_CACHE_HOME/zoo/jax (~/.cache/zoo/jax): ZOO_CACHE_DIR moves it, "
                         "ZOO_COMPILATION_CACHE=0 turns it off; `zoo cache` shows it, `zoo cache --clear` "
                         "empties it. On a CPU, inference compiles "
                         "convolutions and reductions with XLA's own emitter (faster than jaxlib's "
                         "YNNPACK fusions here): ZOO_CPU_XLA_CONV=0 keeps JAX's default.")
console = Console()
err_console = Console(stderr=True)
_debug = {"on": False}


class Framework(str, Enum):
    haiku = "haiku"
    equinox = "equinox"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class Precision(str, Enum):
    highest = "highest"
    default = "default"


class Library(str, Enum):
    timm = "timm"
    torchvision = "torchvision"


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _debug["on"] = debug


def _fail(e: BaseException) -> None:
    if _debug["on"]:
        raise e
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    # The first line; an exception without a message (EOFError()) by its type's name.
    msg = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _overrides(num_classes: Optional[int], no_aux: bool = False,
               transform_input: Optional[bool] = None, in_chans: Optional[int] = None,
               features_only: bool = False, out_indices: Optional[str] = None) -> dict:
    out = {}
    if num_classes is not None:
        out["num_classes"] = num_classes
    if in_chans is not None:
        out["in_chans"] = in_chans
    if features_only:
        out["features_only"] = True
    if out_indices is not None:
        if not features_only:
            raise ValueError("--out-indices needs --features-only")
        try:
            out["out_indices"] = tuple(int(i) for i in out_indices.split(","))
        except ValueError:
            raise ValueError(f"--out-indices takes comma-separated levels such as 1,2,3, not {out_indices!r}") from None
    if no_aux:
        out["aux_logits"] = False
    if transform_input is not None:
        out["transform_input"] = transform_input
    return out


_TRANSFORM_INPUT_HELP = ("GoogLeNet: re-normalise ImageNet-normalised inputs as torchvision's pretrained "
                         "weights expect (implied by --pretrained).")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@app.command("list")
def list_(pattern: str = typer.Argument("*", help="Glob over model names."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
          pretrained: bool = typer.Option(False, "--pretrained",
                                          help="List the pretrained weights timm and torchvision know for them.")) -> None:
    """List the registered architectures (or, with --pretrained, their pretrained weights)."""
    from zoo import registry

    if pretrained:
        try:
            from converters.pretrained import list_pretrained

            rows = list_pretrained(pattern)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        if as_json:
            print(json.dumps(rows))
            return
        table = Table(title=f"{len(rows)} pretrained weights for {len({r['model'] for r in rows})} models")
        for col in ("convert with", "library"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["name"], r["library"])
        console.print(table)
        return
    names = registry.list_models(pattern)
    if as_json:
        print(json.dumps([{"name": n, "timm": registry.get(n).timm, "torchvision": registry.get(n).torchvision}
                          for n in names]))
        return
    table = Table(title=f"{len(names)} models")
    for col in ("name", "timm", "torchvision"):
        table.add_column(col)
    for n in names:
        e = registry.get(n)
        table.add_row(n, e.timm or "-", e.torchvision or "-")
    console.print(table)


@app.command()
def convert(
    name: str = typer.Argument(..., help="Architecture, e.g. resnet50 (see `zoo list`); with --pretrained, "
                                         "optionally a timm tag: resnet50.a1_in1k (see `zoo list --pretrained`)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c",
                                              help="PyTorch checkpoint: .pth/.pt/.bin/.safetensors."),
    pretrained: bool = typer.Option(False, "--pretrained",
                                    help="Fetch weights via timm/torchvision (their caches first; HF_HUB_OFFLINE=1 "
                                         "works) and record their preprocessing."),
    library: Optional[Library] = typer.Option(None, help="Library for --pretrained (default: timm when it has the model)."),
    weights: Optional[str] = typer.Option(None, "--weights",
                                          help="torchvision weights (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT); implies "
                                               "--pretrained --library torchvision."),
    data_config: Optional[str] = typer.Option(
        None, "--data-config",
        help="Preprocessing of one's own checkpoint, recorded for preprocess/predict: a JSON object "
             "(timm's pretrained_cfg keys), a JSON file, or pretrained weights it shares it with "
             "(resnet50.a1_in1k, resnet50:IMAGENET1K_V2)."),
    framework: Framework = typer.Option(..., "--framework", "-f"),
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    fold_bn: bool = typer.Option(False, "--fold-bn", help="Fold BatchNorm into the preceding convs (inference only)."),
    num_classes: Optional[int] = typer.Option(
        None, help="Classifier size (default: the checkpoint's). Another size keeps the backbone and "
                   "initialises a new classifier (timm's reset_classifier); 0: pooled features, no classifier."),
    in_chans: Optional[int] = typer.Option(
        None, "--in-chans", help="Input channels (default: the checkpoint's); another number adapts the "
                                 "input conv as timm does (sum for 1, repeat and rescale for more)."),
    features_only: bool = typer.Option(False, "--features-only",
                                       help="A feature extractor (timm's features_only): no head."),
    out_indices: Optional[str] = typer.Option(None, "--out-indices",
                                              help="With --features-only: levels 0-4, e.g. 1,2,3,4."),
    seed: int = typer.Option(0, help="Seed of a new classifier's initialisation."),
    no_aux: bool = typer.Option(False, "--no-aux", help="GoogLeNet: drop the auxiliary classifiers."),
    transform_input: Optional[bool] = typer.Option(None, "--transform-input/--no-transform-input",
                                                   help=_TRANSFORM_INPUT_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite",
                                         help="Convert a checkpoint holding NaN or Inf values (refused by default)."),
) -> None:
    """Convert a PyTorch checkpoint into a zoo .safetensors file."""
    try:
        from converters import pretrained as hub
        from converters.convert import convert_to_file

        pretrained = pretrained or weights is not None
        if (checkpoint is None) == (not pretrained):
            raise ValueError("pass exactly one of --checkpoint FILE and --pretrained")
        lib = library.value if library else None
        arch = name
        if pretrained:
            arch, lib, _ = hub.resolve(name, lib, weights)  # bad tags fail before any download
        elif "." in name:
            raise ValueError(f"{name} names pretrained weights: pass --pretrained (or the architecture "
                             f"{name.split('.')[0]} with --checkpoint)")
        cfg = hub.data_config(data_config) if data_config else None
        if out.exists() and not force:
            raise FileExistsError(f"{out} exists; pass --force to overwrite")
        overrides = _overrides(num_classes, no_aux, transform_input, in_chans, features_only, out_indices)
        from zoo import registry

        registry.get_spec(arch, **overrides)  # bad options fail before any work
        info = None
        if checkpoint is not None:
            source = checkpoint
        else:
            # Not under a spinner: a download shows its own progress bar.
            fetched = hub.fetch(name, lib, weights)
            source, info = fetched.state_dict, fetched.source
            overrides = {**fetched.overrides, **overrides}
            cfg = cfg or fetched.cfg
        with console.status(f"converting {arch} to {framework.value}…") as status:
            import time

            t0 = time.perf_counter()

            def stage(what: str) -> None:  # large models take tens of seconds: say which part runs
                status.update(f"{arch} → {framework.value}: {what}… ({time.perf_counter() - t0:.0f} s)")

            path = convert_to_file(arch, source, framework.value, out, fold_bn=fold_bn, force=force,
                                   overrides=overrides, seed=seed, allow_nonfinite=allow_nonfinite,
                                   pretrained_cfg=cfg, source_info=info, progress=stage)
        console.print(f"wrote {path} ({_human(path.stat().st_size)})")
    except Exception as e:  # noqa: BLE001 - one line per error, traceback under --debug
        _fail(e)


@app.command()
def verify(
    name: str = typer.Argument(..., help="Architecture, e.g. resnet50."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="The PyTorch checkpoint."),
    framework: Framework = typer.Option(..., "--framework", "-f"),
    converted: Optional[Path] = typer.Option(None, "--converted",
                                             help="A zoo file to check (default: convert in memory)."),
    fold_bn: bool = typer.Option(False, "--fold-bn"),
    device: Device = typer.Option(Device.auto, "--device"),
    batch: int = typer.Option(4, "--batch"),
    size: Tuple[int, int] = typer.Option((224, 224), "--size", help="Input height and width: --size H W."),
    precision: Precision = typer.Option(Precision.highest, "--precision"),
    library: Optional[Library] = typer.Option(None, help="Reference PyTorch library (default: timm when it has the model)."),
    num_classes: Optional[int] = typer.Option(None, help="As for convert: another size is a new head."),
    in_chans: Optional[int] = typer.Option(None, "--in-chans", help="As for convert: an adapted input conv."),
    features_only: bool = typer.Option(False, "--features-only", help="Compare every feature map."),
    out_indices: Optional[str] = typer.Option(None, "--out-indices", help="With --features-only: e.g. 1,2,3,4."),
    no_aux: bool = typer.Option(False, "--no-aux"),
    transform_input: Optional[bool] = typer.Option(None, "--transform-input/--no-transform-input",
                                                   help=_TRANSFORM_INPUT_HELP),
    seed: int = typer.Option(0),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Accept NaN/Inf in the checkpoint."),
    allow_other_source: bool = typer.Option(
        False, "--allow-other-source", help="Compare a --converted file with a checkpoint other than the "
                                            "one it records (by sha256) as its source."),
    verify_digest: bool = typer.Option(True, "--verify-digest/--no-verify-digest",
                                       help="Check the --converted file's content digest."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Run PyTorch and the converted JAX model on the same inputs and compare logits (or features)."""
    try:
        from converters.verify import verify as run_verify

        with console.status(f"verifying {name} ({framework.value}) against PyTorch…"):
            report = run_verify(name, str(checkpoint), framework.value, fold_bn=fold_bn, device=device.value,
                                batch=batch, size=(size[0], size[1]), precision=precision.value, seed=seed,
                                library=library.value if library else None,
                                converted_file=str(converted) if converted else None,
                                overrides=_overrides(num_classes, no_aux, transform_input, in_chans,
                                                     features_only, out_indices),
                                allow_nonfinite=allow_nonfinite, allow_other_source=allow_other_source,
                                check=verify_digest)
    except Exception as e:  # noqa: BLE001
        _fail(e)
        return
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        table = Table(title=f"{name}: {report.framework}{' (bn folded)' if report.fold_bn else ''} vs PyTorch")
        table.add_column("metric")
        table.add_column("value", justify="right")
        rows = [
            ("input", f"{report.batch}x3x{report.size[0]}x{report.size[1]}"),
            ("devices", f"jax {report.jax_device} / torch {report.torch_device}"),
            ("precision", report.precision),
            ("max |Δlogit|", f"{report.max_abs:.3e}"),
            ("‖Δ‖/‖ref‖", f"{report.rel:.3e} (tolerance {report.tolerance_rel:.0e})"),
            ("top-1 agreement", f"{report.top1:.1%}"),
            ("top-5 agreement", f"{report.top5:.1%}"),
            ("result", "[green]PASS[/]" if report.passed else "[red]FAIL[/]"),
        ]
        for k, v in rows:
            table.add_row(k, v)
        console.print(table)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def info(path: Path = typer.Argument(..., help="A zoo .safetensors file."),
         as_json: bool = typer.Option(False, "--json"),
         verify_digest: bool = typer.Option(True, "--verify-digest/--no-verify-digest",
                                            help="Recompute the content digest (reads every tensor).")) -> None:
    """Check a converted file and show its metadata, dtypes, parameter count, digests and size.
    Exits non-zero when the header, the metadata, the tensors' names and shapes (against the
    architecture) or the content digest are wrong."""
    try:
        from zoo.io import inspect_file

        summary = inspect_file(path, check=verify_digest)
    except Exception as e:  # noqa: BLE001
        _fail(e)
        return
    if as_json:
        print(json.dumps(summary))
        return
    table = Table(title=escape(str(path)))
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")  # digests are shown whole, folded, never cut
    for k, v in summary.items():
        text = (str(v).lower() if isinstance(v, bool) else f"{v:,}" if isinstance(v, int)
                else json.dumps(v) if isinstance(v, dict) else str(v))
        table.add_row(Text(k), Text(text))  # file contents are never read as markup
    table.add_row("size", _human(path.stat().st_size))
    console.print(table)


@app.command()
def cache(clear: bool = typer.Option(False, "--clear", help="Delete zoo's compiled programs."),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Where compiled programs are kept, how many and their size; --clear deletes them (after JAX
    warns "Error reading persistent compilation cache entry" in every run, for example). A cache
    folder you gave JAX yourself is only shown."""
    try:
        from zoo import _cache

        summary = _cache.clear() if clear else _cache.describe()
    except Exception as e:  # noqa: BLE001
        _fail(e)
        return
    if clear:
        summary["deleted"] = summary.pop("entries")
    if as_json:
        print(json.dumps(summary))
        return
    if summary["dir"] is None:
        console.print("compilation cache: off (ZOO_COMPILATION_CACHE)", highlight=False)
        return
    owner = "zoo's" if summary["owner"] == "zoo" else "JAX's own (zoo leaves it alone)"
    done = f"deleted {summary['deleted']}" if clear else f"holds {summary['entries']}"
    console.print(Text(f"{summary['dir']}: {owner}; {done} compiled programs, {_human(summary['bytes'])}"))


@app.command()
def predict(path: Path = typer.Argument(..., help="A zoo .safetensors file with a classifier."),
            images: list[Path] = typer.Argument(..., help="Image files (anything PIL opens)."),
            top: int = typer.Option(5, "--top", help="How many classes to show per image."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
            reference: bool = typer.Option(False, "--reference",
                                           help="Also run the PyTorch model (the file's weights, PyTorch's own "
                                                "transforms) and show it beside.")) -> None:
    """Classify images with the preprocessing the file records (its pretrained config; ImageNet
    defaults otherwise): top-k class names and probabilities."""
    try:
        from converters.predict import predict_images

        result = predict_images(path, [str(p) for p in images], top=top, reference=reference)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    if as_json:
        print(json.dumps(result, indent=1))
        return
    cfg = result["preprocessing"]
    console.print(f"{result['arch']} ({result['framework']}); input {cfg.get('input_size', [3, 224, 224])[1:]}, "
                  f"{cfg.get('interpolation', 'bilinear')}, labels: {result['label_set'] or 'class indices'}",
                  highlight=False)
    for row in result["images"]:
        table = Table(title=escape(Path(row["image"]).name), title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("zoo")
        table.add_column("p", justify="right")
        if reference:
            table.add_column("PyTorch")
            table.add_column("p", justify="right")
        for i, t in enumerate(row["top"]):
            cells = [str(i + 1), escape(t["name"]), f"{t['prob']:.4f}"]
            if reference:
                r = row["reference_top"][i]
                cells += [escape(r["name"]), f"{r['prob']:.4f}"]
            table.add_row(*cells)
        console.print(table)
    if reference:
        ref = result["reference"]
        verdict = "same top-k in every image" if ref["same_top_all"] else "top-k DIFFER"
        console.print(f"PyTorch vs zoo: {verdict}; max |Δp| {ref['max_abs_prob_diff']:.2e}, "
                      f"‖Δlogit‖/‖logit‖ {ref['rel_logit_diff']:.2e}", highlight=False)
        if not ref["same_top_all"]:
            raise typer.Exit(1)


@app.command()
def export(path: Path = typer.Argument(..., help="A zoo .safetensors file (either framework, not bn-folded)."),
           out: Path = typer.Option(..., "--out", "-o",
                                    help="PyTorch state dict to write: .pth, .pt or .safetensors."),
           force: bool = typer.Option(False, "--force", help="Overwrite an existing output file.")) -> None:
    """Write a zoo file back as a PyTorch state dict, which the timm / torchvision model of its
    architecture (with the same head options) loads with strict=True."""
    try:
        from zoo.io import export_file

        written = export_file(path, out, force=force)
        console.print(f"wrote {written} ({_human(written.stat().st_size)})")
    except Exception as e:  # noqa: BLE001
        _fail(e)


@app.command("random-checkpoint")
def random_checkpoint(
    name: str = typer.Argument(..., help="Architecture."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (.pth or .safetensors)."),
    library: Optional[Library] = typer.Option(None),
    seed: int = typer.Option(0),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Write a PyTorch checkpoint with random weights and randomised BatchNorm statistics (for trying
    the tools where model hubs are unreachable)."""
    try:
        from zoo.io import atomic_write, check_output_path

        check_output_path(out)  # a missing or read-only folder fails before any work
        import torch

        from converters.torch_models import random_model

        if out.exists() and not force:
            raise FileExistsError(f"{out} exists; pass --force to overwrite")
        with console.status(f"building a random {name}…"):
            sd = random_model(name, library.value if library else None, seed=seed).state_dict()
            if out.suffix == ".safetensors":
                from safetensors.torch import save_file

                tensors = {k: v.contiguous() for k, v in sd.items()}
                atomic_write(out, lambda tmp: save_file(tensors, tmp), force=force)
            else:
                atomic_write(out, lambda tmp: torch.save(sd, tmp), force=force)
        console.print(f"wrote {out} ({_human(out.stat().st_size)})")
    except Exception as e:  # noqa: BLE001
        _fail(e)


# `--size H [W]` and `--impl NAME ...`: click options take a fixed number of values, so the values
# after the first arrive as extra arguments (integers: the width; names: more implementations).
@app.command(context_settings={"allow_extra_args": True})
def bench(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Architecture, e.g. resnet50 (see `zoo list`)."),
    mode: str = typer.Option("inference", "--mode", help="inference, train (one training step) or both."),
    batch: int = typer.Option(8, "--batch", min=1),
    size: int = typer.Option(224, "--size", min=1, help="Input height, then the width if it differs: --size H [W]."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16 (zoo: bf16 compute, PyTorch: autocast)."),
    device: Device = typer.Option(Device.auto, "--device"),
    repeats: int = typer.Option(10, "--repeats", min=1, help="Timed calls; the median is reported."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed calls after the first (compiling) one."),
    impl: Optional[list[str]] = typer.Option(
        None, "--impl", help="Implementations to run (default all): torch-eager-nchw, torch-eager-cl, "
                             "torch-compile-cl, zoo-haiku, zoo-haiku-folded, zoo-equinox, zoo-equinox-folded "
                             "(folded: inference only). --impl A B, --impl A --impl B or --impl A,B."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON (meta and rows)."),
    chart_out: Optional[Path] = typer.Option(None, "--chart", help="Write a bar chart of images/s (PNG; needs matplotlib)."),
) -> None:
    """Time inference and/or a training step of zoo's Haiku and Equinox models beside PyTorch eager
    (NCHW, channels_last) and torch.compile, in one run, on the same batch. Medians of synchronised
    calls; the first (compiling) call is reported apart; ratios are within this run."""
    try:
        from zoo import _bench

        modes = {"inference": ["inference"], "train": ["train"], "both": ["inference", "train"]}.get(mode)
        if modes is None:
            raise ValueError(f"--mode {mode!r}: expected inference, train or both")
        if dtype not in _bench.DTYPES:
            raise ValueError(f"--dtype {dtype!r}: expected float32 or bfloat16")
        widths = [a for a in ctx.args if a.isdigit()]
        names = [a for a in ctx.args if not a.isdigit()]
        if len(widths) > 1 or (widths and ctx.get_parameter_source("size").name != "COMMANDLINE"):
            raise ValueError(f"unexpected argument {widths[-1]!r}; --size takes a height and at most one width")
        if names and not impl:
            raise ValueError(f"unexpected argument {names[0]!r}")
        impls = _bench.select_impls([*(impl or []), *names])
        hw = (size, int(widths[0])) if widths else (size, size)
        if hw[1] < 1:
            raise ValueError("--size: the width must be positive")
        for out in (json_out, chart_out):
            if out is not None:
                from zoo.io import check_output_path

                check_output_path(out)  # before minutes of measuring, not after
        if chart_out is not None:
            _bench._import_figure()

        def saved(results: dict) -> None:
            if json_out is not None:  # after every row: an interrupted run keeps what it measured
                _bench.write_json(results, json_out)

        with console.status(f"{name}: starting…") as status:
            results = _bench.run(name, modes=modes, impls=impls, batch=batch, size=hw, dtype=dtype,
                                 device=device.value, repeats=repeats, warmup=warmup,
                                 on_start=lambda m, i: status.update(f"{name}: {m}, {i}…"), on_row=saved)
        for table in _bench.tables(results):
            console.print(table)
        m = results["meta"]
        console.print(f"jax {m['versions']['jax']} on {escape(m['jax_device'])}, torch {m['versions']['torch']} on "
                      f"{m['torch_device']} ({m['cpu']['torch_threads']} threads); medians of {repeats} calls after "
                      f"{warmup} warm-up; vs: baseline median / this median; first s: the first (compiling) call",
                      highlight=False)
        if json_out is not None:
            _bench.write_json(results, json_out)
            console.print(f"wrote {json_out}")
        if chart_out is not None:
            _bench.chart(results, chart_out)
            console.print(f"wrote {chart_out}")
    except Exception as e:  # noqa: BLE001
        _fail(e)


if __name__ == "__main__":
    sys.exit(app())
