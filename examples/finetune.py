"""Fine-tune a converted PyTorch ResNet on a real dataset, in Haiku or Equinox.

    python examples/finetune.py --framework haiku            # or equinox
    python examples/finetune.py --checkpoint resnet18.pth    # your own timm/torchvision weights

The steps a researcher takes: a PyTorch checkpoint (given, or, where model hubs are unreachable, a
randomly initialised timm one written here), converted to a zoo file, loaded with a new 10-class
head, and fine-tuned with `zoo.training` on scikit-learn's handwritten digits (1,797 8x8 images
shipped inside its wheel: no download), upsampled to RGB at 32x32. Train and test accuracy are
printed per epoch; `--json` writes the history.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import zoo.equinox  # noqa: E402
import zoo.haiku  # noqa: E402
import zoo.training as zt  # noqa: E402

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet's


def digits(size: int, seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as ImageNet-normalised NCHW RGB float32 at size x size: 80% train,
    20% test, split with a fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    gray = data.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    gray = np.asarray(jax.image.resize(jnp.asarray(gray), (len(gray), size, size), "bilinear"))
    rgb = (gray[:, None] - MEAN[None, :, None, None]) / STD[None, :, None, None]
    order = np.random.default_rng(seed).permutation(len(rgb))
    split = int(0.8 * len(rgb))
    train, test = order[:split], order[split:]
    return (rgb[train].astype(np.float32), data.target[train]), (rgb[test].astype(np.float32), data.target[test])


def checkpoint(args: argparse.Namespace, workdir: Path) -> str:
    if args.checkpoint:
        return args.checkpoint
    import torch

    from converters.torch_models import random_model

    path = workdir / f"{args.arch}_random.pth"
    print(f"no --checkpoint: writing a randomly initialised timm {args.arch} to {path} "
          "(pass real weights with --checkpoint; model hubs may be unreachable)")
    torch.save(random_model(args.arch).state_dict(), path)
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=["haiku", "equinox"], default="haiku")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--checkpoint", help="a timm/torchvision checkpoint (.pth, .safetensors, ...)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the history here")
    p.add_argument("--workdir", help="where the checkpoint and zoo file go (default: a temporary folder)")
    args = p.parse_args(argv)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from converters.convert import convert_to_file

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="zoo-finetune-"))
    workdir.mkdir(parents=True, exist_ok=True)
    zoo_file = convert_to_file(args.arch, checkpoint(args, workdir), args.framework,
                               workdir / f"{args.arch}_{args.framework}.safetensors", force=True)
    print(f"converted to {zoo_file}")

    (x_train, y_train), (x_test, y_test) = digits(args.size, args.seed)
    key = jax.random.key(args.seed)
    key, head_key = jax.random.split(key)
    # A new 10-class head on the converted backbone.
    if args.framework == "haiku":
        model, params, state = zoo.haiku.load(str(zoo_file), num_classes=10, key=head_key)
        layout = lambda x: x.transpose(0, 2, 3, 1)  # noqa: E731  (Haiku: NHWC)
    else:
        model, state = zoo.equinox.load(str(zoo_file), num_classes=10, key=head_key)
        params, layout = model, (lambda x: x)

    steps_per_epoch = len(x_train) // args.batch
    total = args.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(50, total // 10), total)
    tx = optax.chain(optax.add_decayed_weights(5e-4, mask=zt.decay_mask),
                     optax.sgd(schedule, momentum=0.9, nesterov=True))
    ts = zt.TrainState.create(params, state, tx)
    train_step = zt.make_train_step(model, tx, label_smoothing=0.1)
    eval_step = zt.make_eval_step(model)
    x_test = layout(x_test)

    history: dict = {"framework": args.framework, "arch": args.arch, "steps": [], "epochs": []}
    rng = np.random.default_rng(args.seed)
    step, start = 0, time.time()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())
    with Progress(*columns) as progress:
        for epoch in range(args.epochs):
            task = progress.add_task(f"epoch {epoch + 1}/{args.epochs}", total=steps_per_epoch, loss=float("nan"))
            order = rng.permutation(len(x_train))
            losses, accs = [], []
            for i in range(steps_per_epoch):
                batch = order[i * args.batch:(i + 1) * args.batch]
                key, step_key = jax.random.split(key)
                ts, metrics = train_step(ts, layout(x_train[batch]), y_train[batch], step_key)
                losses.append(float(metrics["loss"]))
                accs.append(float(metrics["accuracy"]))
                history["steps"].append(losses[-1])
                progress.update(task, advance=1, loss=losses[-1])
                step += 1
                if args.max_steps is not None and step >= args.max_steps:
                    break
            test = eval_step(ts, x_test, y_test)
            row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "train_accuracy": float(np.mean(accs)),
                   "test_loss": float(test["loss"]), "test_accuracy": float(test["accuracy"]),
                   "seconds": round(time.time() - start, 1)}
            history["epochs"].append(row)
            progress.console.print(
                f"epoch {row['epoch']}: train loss {row['train_loss']:.3f} acc {row['train_accuracy']:.3f} | "
                f"test loss {row['test_loss']:.3f} acc {row['test_accuracy']:.3f} ({row['seconds']} s)")
            if args.max_steps is not None and step >= args.max_steps:
                break
    if args.json:
        Path(args.json).write_text(json.dumps(history, indent=1))
    return history


if __name__ == "__main__":
    main()
