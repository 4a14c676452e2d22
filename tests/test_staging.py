"""Staged outputs: a killed run's temporaries are removed by the next run, and only those;
outputs get the permissions the umask allows; an unwritable destination is a message, not a traceback."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from zaya_jax import convert
from zaya_jax.cli import main
from zaya_jax.convert import staging


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs a read-only /sys")
def test_read_only_destination_is_a_message_with_exit_code_1(pristine, capsys):
    # /sys refuses new directories even to root (a chmod'ed directory would not).
    assert main(["convert", str(pristine), "/sys/kernel/zaya-test/dst", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno") and "/sys/kernel/zaya-test" in err and "Traceback" not in err


def _modes(root):
    out = set()
    for directory, _, files in os.walk(root):
        out.add(("dir", stat.S_IMODE(os.stat(directory).st_mode)))
        out.update(("file", stat.S_IMODE(os.stat(os.path.join(directory, f)).st_mode)) for f in files)
    return out


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_converted_and_exported_directories_respect_the_umask(pristine, tmp_path, umask):
    old = os.umask(umask)
    try:
        convert.convert(pristine, tmp_path / "converted", progress=False)
        convert.export(tmp_path / "converted", tmp_path / "exported", progress=False)
    finally:
        os.umask(old)
    for name in ("converted", "exported"):
        assert _modes(tmp_path / name) == {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}, name


def test_rerun_removes_the_temporaries_of_a_killed_convert_and_nothing_else(pristine, tmp_path):
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-m", "zaya_jax.cli", "convert", str(pristine), str(dst), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any(n.startswith(".dst.zaya-tmp-") and os.path.exists(tmp_path / n / "params") for n in os.listdir(tmp_path)):
        assert proc.poll() is None and time.time() < deadline, "the convert ended before it could be killed"
        time.sleep(0.001)  # killed once it writes the params
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (stale,) = [n for n in os.listdir(tmp_path) if n.startswith(".dst.")]
    assert not dst.exists()
    # Lookalikes that are not provably a dead run's: kept.
    live = staging._make_temporary(str(tmp_path), "dst", "tmp")  # this (live) process's
    (tmp_path / ".dst.zaya-tmp-4194304-cafe").mkdir()  # no marker
    (tmp_path / ".dst.tmp-user").mkdir()
    (tmp_path / ".other.zaya-tmp-4194304-beef").mkdir()

    convert.convert(pristine, dst, progress=False)
    left = set(os.listdir(tmp_path))
    assert stale not in left
    assert {os.path.basename(live), ".dst.zaya-tmp-4194304-cafe", ".dst.tmp-user", ".other.zaya-tmp-4194304-beef", "dst"} <= left
    assert convert.is_converted(str(dst))
