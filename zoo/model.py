"""`zoo.Model`: a converted model behind one framework-agnostic inference call."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from . import _cache, _jit, ops
from ._xla import jit_options
from .io import Loaded, load_file

_cache.enable()  # before anything is compiled: see zoo/_cache.py


class Model:
    """A loaded model. `predict` takes an (N, C, H, W) float32 batch exactly as the PyTorch model
    would and returns what it returns, jitted, in inference mode: (N, num_classes) logits, pooled
    features, or (features_only) the list of NCHW feature maps."""

    def __init__(self, loaded: Loaded, predict_fn: Callable[[Array], Array]):
        self.loaded = loaded
        self._predict = predict_fn

    @property
    def framework(self) -> str:
        return self.loaded.framework

    @property
    def arch(self) -> str:
        return self.loaded.arch

    @property
    def metadata(self) -> dict[str, str]:
        return self.loaded.metadata

    @property
    def objects(self) -> Any:
        """Haiku (params, state) or Equinox (model, state)."""
        return self.loaded.objects

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The preprocessing config recorded with the weights (timm's `pretrained_cfg`, or for
        torchvision weights one with `resize_size`: see `zoo._preprocess.validate_cfg`); timm's
        defaults (`zoo._preprocess.default_cfg()`) when the file records none."""
        import json

        from ._preprocess import default_cfg

        raw = self.metadata.get("pretrained_cfg")
        if raw is None:
            return default_cfg()
        try:
            cfg = json.loads(raw)
        except (ValueError, RecursionError):
            raise ValueError("metadata field 'pretrained_cfg' is not JSON") from None
        if not isinstance(cfg, dict):
            raise ValueError("metadata field 'pretrained_cfg' is not a JSON object")
        return cfg

    def preprocess(self, image: Any) -> np.ndarray:
        """One image (a PIL image, a path, or a uint8 (H, W, 3) array; converted to RGB) as the
        (C, H, W) float32 array that the weights' own eval transform gives: timm's
        `create_transform(**resolve_data_config({}, model=m))`, or torchvision's
        `weights.transforms()`, per `pretrained_cfg`. `predict` takes a batch, so stack images
        first: `model.predict(np.stack([model.preprocess(im) for im in images]))`."""
        from ._preprocess import preprocess

        return preprocess(image, self.pretrained_cfg)

    def predict(self, images: Float[Any, "N C H W"]) -> Float[Array, "N K"]:
        return self._predict(jnp.asarray(images, jnp.float32))

    def __repr__(self) -> str:
        folded = ", bn folded" if self.loaded.fold_bn else ""
        return f"zoo.Model({self.arch!r}, framework={self.framework!r}{folded})"

    @classmethod
    def from_file(cls, path: str, *, framework: Optional[str] = None, dtype: Any = None,
                  check: bool = True) -> "Model":
        dtype = jnp.float32 if dtype is None else dtype
        loaded = load_file(path, framework, dtype=dtype, check=check)
        return cls(loaded, make_predict(loaded, dtype))


def make_predict(loaded: Loaded, dtype: Any = jnp.float32) -> Callable[[Array], Array]:
    # Parameters go in as arguments, never as closed-over constants: a jitted closure would embed
    # every weight in the executable (compile time and memory grow with the model).
    if loaded.framework == "haiku":
        from .haiku import build

        net = build(loaded.plan, dtype)
        params, state = loaded.objects
        platform = _jit.platform_of(jax.tree_util.tree_leaves(params))

        # jax.jit's own dispatch (zoo's Jitted flattens in Python: 0.25 ms more a call), with the
        # CPU compiler options left out inside the caller's own transformation (`jax.grad` of a
        # logit for a saliency map, `jax.jit`), where JAX refuses them.
        @functools.partial(_jit.TopLevel, **jit_options())
        def apply(params: Any, state: Any, x: Array) -> Array:
            with ops.tracing_for(platform):
                out, _ = net.apply(params, state, None, jnp.transpose(x, (0, 2, 3, 1)), is_training=False)
            # Feature maps come back as PyTorch lays them out (NCHW), as from the Equinox model.
            return jax.tree_util.tree_map(lambda a: jnp.transpose(a, (0, 3, 1, 2)) if a.ndim == 4 else a, out)

        return functools.partial(apply, params, state)

    import equinox as eqx

    from .equinox.layers import with_hwio_kernels

    model, state = loaded.objects
    model = eqx.nn.inference_mode(model)
    # On a CPU the model is bound with its convolution kernels stored HWIO (Haiku's layout) and
    # read in place. Bound as PyTorch's OIHW, every call copied every kernel: 54 transposes in a
    # ResNet-50's optimized CPU program, 10% of a batch-8 call and half of a batch-1 one; and 1x1
    # kernels read as (O, I) cost a batch-1 ResNet-50 8% (docs/benchmarks.md). The price is a
    # second copy of the convolution kernels while the predict lives (94 MB for a ResNet-50).
    # Elsewhere the model is bound as it is: cuDNN's NHWC convolutions read OHWI kernels, neither
    # layout (on an H200 its convolution kernels took the time Haiku's did).
    on_cpu = _jit.platform_of(jax.tree_util.tree_leaves(model)) == "cpu"
    bound = with_hwio_kernels(model) if on_cpu else model

    # The model goes in as its list of arrays, flattened once here: an Equinox module flattens in
    # Python, and `filter_jit` did that, and partitioned it, in every call (host time that a GPU
    # waits for; docs/benchmarks.md).
    arrays, static = eqx.partition(bound, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten(arrays)

    @functools.partial(_jit.jit, **jit_options())
    def apply_eqx(leaves: list[Array], state: Any, x: Array) -> Array:
        model = eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static)
        # The whole batch in one call, not the vmapped model: in inference mode the layers take a
        # batch (`zoo.equinox.layers`), and tracing through vmap tripled this function's trace,
        # which every process pays on its first call, compilation cache or not.
        return model(x, state)[0]

    return functools.partial(apply_eqx, leaves, state)

