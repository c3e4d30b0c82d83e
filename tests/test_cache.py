"""zoo's persistent compilation cache: where it goes, how it is turned off, and that a second
process reuses what the first compiled (JAX's own cache-hit events, counted in the child). Speed is
measured in benchmarks/bench_startup.py, not asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import jax, jax.numpy as jnp
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
import zoo.haiku  # turns the cache on
# Every program is cached, however fast it compiles on this machine: the mechanism is under test.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
x = jnp.ones((1, 3, 17, 19))
w = jnp.ones((4, 3, 3, 3))
conv = jax.jit(lambda x, w: jax.nn.relu(jax.lax.conv(x, w, (2, 2), "SAME")).sum())
jax.block_until_ready(conv(x, w))
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir,
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _run(env: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ZOO_", "JAX_COMPILATION_CACHE"))}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_reuses_compiled_programs(tmp_path):
    cache = tmp_path / "jax-cache"
    first = _run({"ZOO_CACHE_DIR": str(cache)})
    assert first["dir"] == str(cache) and first["misses"] >= 1
    written = sorted(p.name for p in cache.iterdir())
    assert written, "nothing was written to the cache"
    second = _run({"ZOO_CACHE_DIR": str(cache)})
    assert second["hits"] >= first["misses"] - second["misses"] and second["hits"] >= 1
    assert sorted(p.name for p in cache.iterdir()) == written  # used, not recompiled and rewritten

    off = tmp_path / "off"
    disabled = _run({"ZOO_CACHE_DIR": str(off), "ZOO_COMPILATION_CACHE": "0"})
    assert disabled["dir"] is None and disabled["hits"] == 0 and not off.exists()


def test_cache_location(monkeypatch, tmp_path):
    from zoo import _cache

    for var in ("ZOO_CACHE_DIR", "ZOO_COMPILATION_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _cache.cache_dir() == tmp_path / ".cache" / "zoo" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache.cache_dir() == tmp_path / "xdg" / "zoo" / "jax"
    monkeypatch.setenv("ZOO_CACHE_DIR", "~/elsewhere")
    assert _cache.cache_dir() == tmp_path / "elsewhere"
    for off in ("0", "false", "OFF", "no"):
        monkeypatch.setenv("ZOO_COMPILATION_CACHE", off)
        assert _cache.cache_dir() is None


def test_a_cache_the_user_gave_jax_is_kept(tmp_path):
    out = _run({"ZOO_CACHE_DIR": str(tmp_path / "zoo"), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine")})
    assert out["dir"] == str(tmp_path / "mine") and not (tmp_path / "zoo").exists()
