"""Safe writes: no partial file or temp debris after a kill, a signal or a race; clear errors for an
output folder that cannot be written; the umask's file mode."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file as st_load
from typer.testing import CliRunner

import zoo.io
from cli import app
from converters.convert import convert_to_file
from zoo.io import atomic_write, build_metadata, check_output_path, read_metadata, save_file

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

MB = 1 << 20
BIG = 200 * MB  # the killed writer's file

# A writer process: argv = target, size, chunk, pause per chunk (s), fill byte, barrier file or "-".
# It prints "ready" once imported, waits for the barrier file if one is named, then writes `size`
# bytes of `fill` through atomic_write in chunks; a lost race exits 3 with one line on stderr.
WRITER = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a plain process has them, whatever the parent set
signal.signal(signal.SIGINT, signal.default_int_handler)
from zoo.io import atomic_write

at_create = int(os.environ.get("ZOO_TEST_SIGNAL_AT_CREATE", "0"))
if at_create:  # the worst moment: the signal lands as the temp file comes into existence
    real_open = os.open
    def signalling_open(file, *args, **kwargs):
        fd = real_open(file, *args, **kwargs)
        if str(file).endswith(".tmp"):
            os.kill(os.getpid(), at_create)
        return fd
    os.open = signalling_open

target, size, chunk, pause, fill, barrier = sys.argv[1:7]
size, chunk, pause = int(size), int(chunk), float(pause)

def write(tmp):
    block = fill.encode() * chunk
    with open(tmp, "wb") as f:
        for _ in range(size // chunk):
            f.write(block)
            if pause:
                time.sleep(pause)

print("ready", flush=True)
if barrier != "-":
    while not os.path.exists(barrier):
        time.sleep(0.001)
try:
    atomic_write(target, write)
except FileExistsError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
"""


def _writer(target: Path, size: int, *, chunk: int = MB, pause: float = 0.0, fill: str = "z",
            barrier: str = "-", signal_at_create: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "ZOO_TEST_SIGNAL_AT_CREATE": str(int(signal_at_create))}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(size), str(chunk), str(pause),
                             fill, barrier], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _wait_for_temp(folder: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not _temps(folder):
        assert time.monotonic() < deadline, "the writer made no temp file"
        time.sleep(0.002)


def _assert_absent_or_complete(target: Path, size: int, fill: bytes = b"z") -> None:
    if target.exists():
        assert target.stat().st_size == size
        with open(target, "rb") as f:
            assert f.read(16) == fill * 16
            f.seek(size - 16)
            assert f.read() == fill * 16


def _small_write(target: Path) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"ok"), force=True)
    assert target.read_bytes() == b"ok"


def _arrays():
    return {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a.bias": np.ones(2, np.float32)}


def _metadata():
    return build_metadata(framework="haiku", arch="resnet18", overrides={}, fold_bn=False,
                          source={"kind": "in-memory"})


# --- kills and signals --------------------------------------------------------------------------


def test_sigkill_leaves_no_partial_file_and_the_next_write_sweeps_the_debris(tmp_path):
    rng = random.Random(1234)
    target = tmp_path / "big.bin"
    left_debris = 0
    for _ in range(3):
        # 200 chunks of 1 MiB with a 2 ms pause: about half a second of writing at the least.
        proc = _writer(target, BIG, pause=0.002)
        time.sleep(rng.uniform(0.05, 0.45))
        proc.kill()
        assert proc.wait(10) == -signal.SIGKILL
        proc.stdout.close()
        proc.stderr.close()
        _assert_absent_or_complete(target, BIG)
        left_debris += bool(_temps(tmp_path))
        _small_write(target)  # the next write of the same target removes the dead writer's temp file
        assert _temps(tmp_path) == []
        target.unlink()
    assert left_debris, "no kill landed during a write: the debris sweep went untested"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_remove_the_temp_file_and_still_end_the_process(tmp_path, signum):
    target = tmp_path / "big.bin"
    proc = _writer(target, BIG, pause=0.005)  # a second or more
    _wait_for_temp(tmp_path)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == -signum, err
    assert not target.exists()
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_as_the_temp_file_is_created_leaves_no_temp_file(tmp_path, signum):
    # The handlers must be in place before the file exists: the CI once caught a SIGTERM landing
    # between the temp file's creation and the handlers' installation, which left the file.
    target = tmp_path / "big.bin"
    proc = _writer(target, MB, signal_at_create=signum)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == -signum, err
    assert not target.exists()
    assert _temps(tmp_path) == []


def test_race_without_force_one_writer_wins(tmp_path):
    target = tmp_path / "raced.bin"
    barrier = tmp_path / "go"
    size, chunk = 2 * MB, 256 * 1024
    procs = [_writer(target, size, chunk=chunk, pause=0.01, fill=fill, barrier=str(barrier)) for fill in "ab"]
    barrier.touch()
    results = [(p.wait(20), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 3], results
    rc, _, err = next(r for r in results if r[0] == 3)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "exists" in lines[0] and "--force" in lines[0], err
    data = target.read_bytes()
    assert len(data) == size and data in (b"a" * size, b"b" * size)
    assert _temps(tmp_path) == []


def test_a_temp_name_that_exists_is_drawn_again_and_never_touched(tmp_path, monkeypatch):
    # The name's random part collides (this pid's leftover, after pid reuse): the write draws
    # again and leaves that file alone; if every draw collides it fails and leaves nothing.
    target = tmp_path / "t.bin"
    taken = tmp_path / f".t.bin.{os.getpid()}.aaaaaaaaaaaa.tmp"
    taken.write_bytes(b"not ours")
    draws = iter(["aaaaaaaaaaaa", "aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(zoo.io.secrets, "token_hex", lambda n: next(draws))
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"ok"))
    assert target.read_bytes() == b"ok" and taken.read_bytes() == b"not ours"
    assert _temps(tmp_path) == [taken.name]

    monkeypatch.setattr(zoo.io.secrets, "token_hex", lambda n: "aaaaaaaaaaaa")
    with pytest.raises(FileExistsError, match="no free temp file name"):
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"x"), force=True)
    assert target.read_bytes() == b"ok" and taken.read_bytes() == b"not ours"
    assert _temps(tmp_path) == [taken.name]


def test_only_dead_writers_temp_files_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [f".t.bin.{live.pid}.abc_123.tmp",  # a live writer's
                f".t.bin.{os.getpid()}.zzzzzzzz.tmp",  # this process's
                ".t.bin.abcdefgh.tmp",  # no pid in the name (older zoo)
                f".t.bin.x.{dead.pid}.abc.tmp",  # the temp file of target "t.bin.x"
                f".other.bin.{dead.pid}.abc.tmp",  # another target's
                ".t.bin.0.abc.tmp"]  # pid 0 would mean the process group
        gone = f".t.bin.{dead.pid}.k9x_2ab1.tmp"
        for name in [*keep, gone]:
            (tmp_path / name).write_bytes(b"partial")
        _small_write(tmp_path / "t.bin")
        assert _temps(tmp_path) == sorted(keep)
    finally:
        live.kill()
        live.wait()


def test_handlers_are_set_during_the_write_and_restored(tmp_path):
    # Under pytest-xdist a worker may ignore SIGINT (and then atomic_write rightly leaves it
    # alone): start from the handlers a plain Python process has.
    outer = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = {s: signal.getsignal(s) for s in outer}
        seen = {}

        def write(tmp):
            seen.update({s: signal.getsignal(s) for s in before})
            Path(tmp).write_bytes(b"x")

        atomic_write(tmp_path / "f.bin", write)
        assert all(getattr(h, "_zoo_temp_handler", False) for h in seen.values())
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        for s, h in outer.items():
            signal.signal(s, h)


def test_a_python_handler_decides(tmp_path):
    """A handler that returns (a graceful-shutdown flag) lets the write finish; one that raises
    unwinds it, and the temp file goes."""
    calls = []

    def flag(signum, frame):
        calls.append(signum)

    def stop(signum, frame):
        raise RuntimeError("stop")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"1")
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the Python handler runs between bytecodes, at once
                time.sleep(0)
            f.write(b"2")

    previous = signal.signal(signal.SIGTERM, flag)
    try:
        atomic_write(tmp_path / "kept.bin", write)
        assert calls == [signal.SIGTERM] and (tmp_path / "kept.bin").read_bytes() == b"12"
        assert signal.getsignal(signal.SIGTERM) is flag
        signal.signal(signal.SIGTERM, stop)
        with pytest.raises(RuntimeError, match="stop"):
            atomic_write(tmp_path / "stopped.bin", write)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not (tmp_path / "stopped.bin").exists()
    assert _temps(tmp_path) == []


def test_writes_from_other_threads(tmp_path):
    errors = []

    def run():
        try:
            save_file(tmp_path / "t.safetensors", _arrays(), _metadata())
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors == []
    assert set(st_load(str(tmp_path / "t.safetensors"))) == set(_arrays())


# --- output folders and modes -------------------------------------------------------------------


def _one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


def test_missing_output_folder(tmp_path):
    missing = tmp_path / "missing"
    # The input does not exist either: the output folder is checked first, before any work.
    _one_line_error(runner.invoke(app, ["export", str(tmp_path / "in.safetensors"), "--out", str(missing / "o.pth")]),
                    "does not exist", str(missing))
    _one_line_error(runner.invoke(app, ["random-checkpoint", "resnet18", "--out", str(missing / "r.pth")]),
                    "does not exist", str(missing))
    _one_line_error(runner.invoke(app, ["convert", "resnet18", "-c", str(tmp_path / "nope.pth"), "-f", "haiku",
                                        "-o", str(missing / "m.safetensors")]),
                    "does not exist", str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_to_file("resnet18", tmp_path / "nope.pth", "haiku", missing / "m.safetensors")
    assert not missing.exists()

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    _one_line_error(runner.invoke(app, ["export", str(tmp_path / "in.safetensors"), "--out",
                                        str(not_a_folder / "o.pth")]), "is not a folder")
    with pytest.raises(IsADirectoryError):
        check_output_path(tmp_path)


def test_read_only_output_folder(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root may write anyway: let os.access say what it says to others
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
        _one_line_error(runner.invoke(app, ["export", str(tmp_path / "in.safetensors"), "--out", str(ro / "o.pth")]),
                        "not writable", str(ro))
        _one_line_error(runner.invoke(app, ["random-checkpoint", "resnet18", "--out", str(ro / "r.pth")]),
                        "not writable", str(ro))
        with pytest.raises(PermissionError, match="not writable"):
            convert_to_file("resnet18", tmp_path / "nope.pth", "haiku", ro / "m.safetensors")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_get_the_umasks_mode(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        path = save_file(tmp_path / "m.safetensors", _arrays(), _metadata())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert read_metadata(path)["arch"] == "resnet18"
    stored = st_load(str(path))
    for k, v in _arrays().items():
        np.testing.assert_array_equal(stored[k], v)
    assert _temps(tmp_path) == []


def test_random_checkpoint_writes_atomically(tmp_path, monkeypatch):
    written = []
    real = zoo.io.atomic_write

    def recording(path, write, **kw):
        written.append(Path(path))
        return real(path, write, **kw)

    monkeypatch.setattr(zoo.io, "atomic_write", recording)
    out = tmp_path / "r.safetensors"
    old = os.umask(0o022)
    try:
        result = runner.invoke(app, ["random-checkpoint", "resnet10t", "--out", str(out)])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert written == [out] and out.stat().st_mode & 0o777 == 0o644
    assert "conv1.0.weight" in st_load(str(out))
    assert _temps(tmp_path) == []
    again = runner.invoke(app, ["random-checkpoint", "resnet10t", "--out", str(out)])
    _one_line_error(again, "--force")
