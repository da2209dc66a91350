"""write_atomic: permissions kept, symbolic links written through, leftovers of killed writers cleaned up."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lr2vq_analysis._io import temp_file_pattern, write_atomic

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions, symbolic links and signals")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o604, 0o755])
def test_overwriting_keeps_the_destination_mode(tmp_path, mode):
    target = tmp_path / "report.json"
    target.write_bytes(b"old")
    os.chmod(target, mode)
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == mode


def test_a_new_file_gets_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.bin") == 0o640  # 0666 minus the umask, as open() gives


def test_a_symbolic_link_is_written_through(tmp_path):
    real = tmp_path / "store" / "model.lr2vq"
    real.parent.mkdir()
    real.write_bytes(b"old")
    os.chmod(real, 0o600)
    link = tmp_path / "model.lr2vq"
    link.symlink_to(real)
    assert write_atomic(link, b"new") == link
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == b"new" and _mode(real) == 0o600
    assert sorted(p.name for p in real.parent.iterdir()) == ["model.lr2vq"]


def test_a_dangling_link_creates_its_target_and_a_loop_is_refused(tmp_path):
    link = tmp_path / "out.bin"
    link.symlink_to(tmp_path / "target.bin")
    write_atomic(link, b"abc")
    assert link.is_symlink() and (tmp_path / "target.bin").read_bytes() == b"abc"
    loop_a, loop_b = tmp_path / "a", tmp_path / "b"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    with pytest.raises(OSError):
        write_atomic(loop_a, b"x")
    assert loop_a.is_symlink() and loop_b.is_symlink()


def test_chunks_are_written_in_order(tmp_path):
    target = write_atomic(tmp_path / "a.bin", (bytes([i]) * 3 for i in range(4)))
    assert target.read_bytes() == b"\0\0\0\1\1\1\2\2\2\3\3\3"


def test_a_failing_payload_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def chunks():
        yield b"partial"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_atomic(target, chunks())
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


# Loads _io.py by path: the package's __init__ (and torch) would only slow the subprocess down.
_WRITER = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("lr2vq_io", sys.argv[3])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
write_atomic = io.write_atomic

def chunks():
    yield b"x" * 1_000_000
    Path(sys.argv[2]).write_text("writing")  # tell the parent the temporary file exists
    time.sleep(60)
    yield b"never"

write_atomic(sys.argv[1], chunks())
"""


def _start_writer(target: Path, flag: Path) -> subprocess.Popen[bytes]:
    module = Path(__file__).resolve().parents[1] / "lr2vq_analysis" / "_io.py"
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(flag), str(module)])
    deadline = time.monotonic() + 120
    while not flag.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the writer subprocess did not start writing")
        time.sleep(0.05)
    return process


def _temporaries(target: Path) -> list[Path]:
    pattern = temp_file_pattern(target)
    return [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)]


def test_kill_during_a_write_keeps_the_old_file_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "model.lr2vq"
    target.write_bytes(b"old")
    process = _start_writer(target, tmp_path / "flag")
    leftovers = _temporaries(target)
    assert len(leftovers) == 1 and f".{process.pid}-" in leftovers[0].name
    assert leftovers[0].stat().st_size == 1_000_000  # flushed before the pause
    # While the writer lives, another write to the same destination leaves its temporary file alone.
    write_atomic(target, b"concurrent")
    assert _temporaries(target) == leftovers
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert target.read_bytes() == b"concurrent" and leftovers[0].exists()
    # A temporary file of another destination, and look-alike names, are never touched.
    others = [tmp_path / f".other.lr2vq.{process.pid}-abcdefgh.tmp", tmp_path / f".model.lr2vq.{process.pid}.tmp"]
    for other in others:
        other.write_bytes(b"keep")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert not leftovers[0].exists() and all(other.exists() for other in others)
    assert _temporaries(target) == []


def test_temp_file_pattern_is_specific_to_the_destination():
    pattern = temp_file_pattern("/x/model.lr2vq")
    assert pattern.fullmatch(".model.lr2vq.123-abc_def9.tmp").group(1) == "123"
    for name in (
        ".model.lr2vq.123.tmp",
        ".model.lr2vq.abc-def.tmp",
        ".model.lr2vq.bak.123-abcdefgh.tmp",
        ".modelXlr2vq.123-abcdefgh.tmp",
        "model.lr2vq.123-abcdefgh.tmp",
        ".model.lr2vq.123-abcdefgh.tmp.456-abcdefgh.tmp",
    ):
        assert pattern.fullmatch(name) is None, name
