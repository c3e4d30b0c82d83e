"""zoo: PyTorch CNNs (timm / torchvision ResNets, GoogLeNet) as dm-haiku and Equinox models.

`import zoo` is light: it imports neither torch nor a JAX framework until one is used.
"""

__version__ = "0.1.0"

from .checked import ConversionError  # noqa: E402
from .registry import list_models  # noqa: E402


def load(path, *, framework=None, dtype=None, check=True):
    """Load a converted `.safetensors` file as a framework-agnostic `zoo.Model`; `dtype` is the
    compute dtype (default float32; bfloat16/float16 for mixed precision). The file is checked
    before use: header, metadata, every name and shape, and (unless `check=False`) its content
    against the digest recorded when it was written."""
    from .model import Model

    return Model.from_file(path, framework=framework, dtype=dtype, check=check)


def __getattr__(name):
    if name == "Model":
        from .model import Model

        return Model
    if name in ("haiku", "equinox", "training"):
        import importlib

        return importlib.import_module(f"zoo.{name}")
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


__all__ = ["ConversionError", "list_models", "load", "Model", "haiku", "equinox", "training", "__version__"]
