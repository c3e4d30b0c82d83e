"""JAX's persistent compilation cache, on by default for zoo.

Compiling a model's jitted forward or training step takes seconds on a CPU and up to a minute on a
GPU (GoogLeNet's training step); JAX can keep the compiled executables on disk and reuse them in
the next process. zoo turns that on the first time it builds a model or a jitted function:

- the directory is `$ZOO_CACHE_DIR`, else `$XDG_CACHE_HOME/zoo/jax`, else `~/.cache/zoo/jax`;
- `ZOO_COMPILATION_CACHE=0` (or `false`/`off`/`no`) leaves JAX's configuration untouched;
- a cache directory the user already gave JAX (`JAX_COMPILATION_CACHE_DIR`,
  `jax.config.update("jax_compilation_cache_dir", ...)`) is kept: zoo never moves it.

The cache is JAX's, so it is process-wide: the user's own jitted functions are cached too, which is
what one wants from a cache they did not disable. Like JAX's, it is trusted: a directory others can
write to lets them run code in this process, so the default lives in the user's own cache folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

# JAX skips programs that compiled in under a second; zoo's smaller models compile in less than
# that on a CPU yet their first call still pays tracing plus compilation, so a lower bar is used.
MIN_COMPILE_SECONDS = 0.2
_OFF = {"0", "false", "off", "no"}
_state: dict[str, Optional[str]] = {}


def switched_off(variable: str) -> bool:
    """Whether the environment turns one of zoo's switches off (`0`, `false`, `off` or `no`)."""
    return os.environ.get(variable, "1").strip().lower() in _OFF


def cache_dir() -> Optional[Path]:
    """Where zoo puts compiled programs, or None when `ZOO_COMPILATION_CACHE` turns it off."""
    if switched_off("ZOO_COMPILATION_CACHE"):
        return None
    if os.environ.get("ZOO_CACHE_DIR"):
        return Path(os.environ["ZOO_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zoo" / "jax"


def enable() -> Optional[str]:
    """Point JAX's persistent compilation cache at `cache_dir()` unless the user configured JAX's
    own or turned zoo's off; idempotent. Returns the directory in use (None: no cache)."""
    if "dir" in _state:
        return _state["dir"]
    import jax

    current = jax.config.jax_compilation_cache_dir
    path = cache_dir()
    if current:
        _state["dir"] = current
    elif path is None:
        _state["dir"] = None
    else:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            # A read-only home must not stop a model from running: no cache, as with JAX's default.
            _state["dir"] = None
            return None
        jax.config.update("jax_compilation_cache_dir", str(path))
        if jax.config.jax_persistent_cache_min_compile_time_secs > MIN_COMPILE_SECONDS:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
        _state["dir"] = str(path)
    return _state["dir"]


# JAX names an entry `<module>-<hash>-cache`, and the access time its LRU eviction keeps
# `<module>-<hash>-atime`; only those are counted or deleted, whatever else the folder holds.
_ENTRY_SUFFIXES = ("-cache", "-atime")


def _entries(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_ENTRY_SUFFIXES))


def describe() -> dict[str, object]:
    """The cache a zoo process would use: `dir` (None: off), `owner` ("zoo": zoo's own folder;
    "jax": a folder the user gave JAX), and its compiled programs (`entries`, `bytes`)."""
    import jax

    given = jax.config.jax_compilation_cache_dir  # zoo's own folder once `enable` ran
    ours = cache_dir()
    theirs = bool(given) and (ours is None or Path(given).expanduser() != ours)
    folder = Path(given).expanduser() if theirs else ours
    if folder is None:
        return {"dir": None, "owner": None, "entries": 0, "bytes": 0}
    entries = [p for p in _entries(folder) if p.name.endswith("-cache")]
    return {"dir": str(folder), "owner": "jax" if theirs else "zoo", "entries": len(entries),
            "bytes": sum(p.stat().st_size for p in entries)}


def clear() -> dict[str, object]:
    """Delete the compiled programs in zoo's own cache folder (what `describe` counts), e.g. after
    JAX warns "Error reading persistent compilation cache entry" in every process: JAX never
    rewrites an entry that exists, so one left truncated (a process killed while writing it) is
    read, rejected and recompiled in every process until it is deleted. A folder the user gave JAX
    is theirs and left alone (a ValueError). Returns `describe()` from before the deletion."""
    before = describe()
    if before["owner"] == "jax":
        raise ValueError(f"the compilation cache is JAX's own folder {before['dir']} (JAX_COMPILATION_CACHE_DIR "
                         "or jax.config), not zoo's: zoo leaves it alone")
    if before["dir"] is not None:
        for p in _entries(Path(str(before["dir"]))):
            p.unlink(missing_ok=True)
    return before
