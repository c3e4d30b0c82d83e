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


def _python(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """A fresh Python process with this one's environment less any cache setting, plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ZOO_", "JAX_COMPILATION_CACHE"))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
                          timeout=300)


def _run_full(env: dict[str, str]) -> tuple[dict, str]:
    """CHILD's JSON line, and its stderr (JAX's warnings)."""
    proc = _python(env, "-c", CHILD)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _run(env: dict[str, str]) -> dict:
    return _run_full(env)[0]


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


def _zoo_cache(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return _python(env, "-c", "from cli import app; app()", "cache", *args)


def test_a_truncated_entry_is_recompiled_every_time_until_zoo_cache_clear(tmp_path):
    """What a user meets after a process died while JAX wrote an entry: every later process warns
    and recompiles (JAX never rewrites an existing entry); `zoo cache --clear` ends it."""
    cache = tmp_path / "jax-cache"
    env = {"ZOO_CACHE_DIR": str(cache)}
    first, _ = _run_full(env)
    assert first["misses"] >= 1
    entry = max((p for p in cache.iterdir() if p.name.startswith("jit__lambda")), key=lambda p: p.stat().st_size)
    truncated = entry.read_bytes()[: entry.stat().st_size // 2]
    entry.write_bytes(truncated)
    (cache / "notes.txt").write_text("not JAX's")

    for _ in range(2):
        broken, err = _run_full(env)
        assert "Error reading persistent compilation cache entry" in err and broken["misses"] >= 1
    assert entry.read_bytes() == truncated  # never rewritten

    shown = _zoo_cache(env, "--json")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["dir"] == str(cache) and summary["owner"] == "zoo"
    assert summary["entries"] == len(list(cache.glob("*-cache"))) >= 1
    assert summary["bytes"] == sum(p.stat().st_size for p in cache.glob("*-cache"))

    cleared = _zoo_cache(env, "--clear")
    assert cleared.returncode == 0 and "deleted" in cleared.stdout, cleared.stderr
    assert [p.name for p in cache.iterdir()] == ["notes.txt"]  # only JAX's entries go

    refill, err = _run_full(env)
    assert "Error reading" not in err and refill["misses"] >= 1
    again, err = _run_full(env)
    assert "Error reading" not in err and again["hits"] >= 1 and again["misses"] == 0


def test_zoo_cache_leaves_a_folder_given_to_jax_and_says_when_off(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "jit_f-0123-cache").write_bytes(b"x" * 10)
    refused = _zoo_cache({"JAX_COMPILATION_CACHE_DIR": str(mine)}, "--clear")
    assert refused.returncode == 1 and "leaves it alone" in refused.stderr
    assert (mine / "jit_f-0123-cache").exists()
    shown = _zoo_cache({"JAX_COMPILATION_CACHE_DIR": str(mine)}, "--json")
    assert json.loads(shown.stdout) == {"dir": str(mine), "owner": "jax", "entries": 1, "bytes": 10}
    off = _zoo_cache({"ZOO_COMPILATION_CACHE": "0"})
    assert off.returncode == 0 and "off" in off.stdout

    # Inside a process that already runs zoo's cache, JAX's setting is zoo's folder: still zoo's.
    code = "import json; from zoo import _cache; _cache.enable(); print(json.dumps(_cache.describe()))"
    proc = _python({"ZOO_CACHE_DIR": str(tmp_path / "z")}, "-c", code)
    assert json.loads(proc.stdout) == {"dir": str(tmp_path / "z"), "owner": "zoo", "entries": 0, "bytes": 0}
