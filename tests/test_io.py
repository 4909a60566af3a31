"""utils/io.py: atomic directories and files are durable (fsynced) before and after their rename, and what killed
runs left behind is cleaned up at the next write of the same target, never what a live process is writing."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from utils import io

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def run_and_kill(target: Path, kill_at: str) -> int:
    """Write `target` with atomic_dir in a real process that SIGKILLs itself inside the body ("body") or between
    the two renames ("rename"); returns its PID."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from utils import io
        replace = os.replace
        def killing_replace(a, b):
            if Path(a).name == {target.name!r}:  # the old version is moved aside: die before the new one moves in
                replace(a, b)
                os.kill(os.getpid(), signal.SIGKILL)
            replace(a, b)
        os.replace = killing_replace
        with io.atomic_dir({str(target)!r}) as tmp:
            (tmp / "weights.bin").write_bytes(b"new" * 1000)
            if {kill_at!r} == "body":
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, err
    return proc.pid


def test_a_killed_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    target = tmp_path / "checkpoint-7"
    pid = run_and_kill(target, "body")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".checkpoint-7.tmp-{pid}"]
    with io.atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]
    assert (target / "weights.bin").read_bytes() == b"ok"


def test_stale_temporaries_of_dead_processes_go_live_ones_and_other_targets_stay(tmp_path):
    target = tmp_path / "out"
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leftovers = {f".out.tmp-{dead}": True, f".out.old-{dead}": True,       # dead: removed
                     f".out.tmp-{live.pid}": False, f".out.old-{live.pid}": False,  # a live process's: kept
                     f".other.tmp-{dead}": False, f".out.tmp-{dead}.bak": False,  # not this target's
                     "out.tmp-1": False}
        for name in leftovers:
            (tmp_path / name).mkdir()
            (tmp_path / name / "f").write_text("x")
        (tmp_path / f".out.tmp-{dead + 1_000_000_000}").write_text("a stale file, not a directory")
        with io.atomic_dir(target) as tmp:
            (tmp / "f").write_text("new")
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"out"} | {name for name, removed in leftovers.items() if not removed}
        assert (tmp_path / f".out.tmp-{live.pid}" / "f").read_text() == "x"  # untouched, contents and all
    finally:
        live.kill()
        live.wait()


def test_a_run_killed_between_its_renames_loses_no_complete_version(tmp_path):
    """Killed after the old version moved aside and before the new one moved in: `out` is missing, but the next
    write first completes that commit (the new version was complete and synced), so nothing complete is lost."""
    target = tmp_path / "out"
    with io.atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"old")
    pid = run_and_kill(target, "rename")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.old-{pid}", f".out.tmp-{pid}"]
    with pytest.raises(RuntimeError):
        with io.atomic_dir(target):
            raise RuntimeError("this write fails")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "weights.bin").read_bytes() == b"new" * 1000


@pytest.fixture
def synced(monkeypatch) -> list[tuple[str, str]]:
    """Records ("fsync", path) for every os.fsync and ("replace", destination) for every os.replace, in order."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst):
        replace(src, dst)
        events.append(("replace", str(dst)))

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name a descriptor's file")
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


def test_atomic_dir_syncs_every_file_and_directory_then_the_parent_after_the_rename(tmp_path, synced):
    parent = tmp_path.resolve() / "run"
    target = parent / "checkpoint-3"
    with io.atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w" * 4096)
        (tmp / "trainer_state.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "optimizer.pt").write_bytes(b"o" * 100)
        tmp_name = str(tmp)
    files = {f"{tmp_name}/model.safetensors", f"{tmp_name}/trainer_state.json", f"{tmp_name}/sub/optimizer.pt"}
    renamed = synced.index(("replace", str(target)))
    before, after = synced[:renamed], synced[renamed + 1:]
    assert sorted(p for _, p in before) == sorted(files | {f"{tmp_name}/sub", tmp_name})  # each once: one pass
    assert before[-1] == ("fsync", tmp_name)  # the directory after its files
    assert after == [("fsync", str(parent))]

    synced.clear()  # replacing an existing version: the same, and the parent is synced after the last rename
    with io.atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"v")
    assert [e for e in synced if e[0] == "replace"] == [("replace", str(parent / f".checkpoint-3.old-{os.getpid()}")),
                                                        ("replace", str(target))]
    assert synced[-1] == ("fsync", str(parent)) and (target / "model.safetensors").read_bytes() == b"v"


def test_atomic_write_text_syncs_the_file_then_the_directory(tmp_path, synced):
    target = tmp_path.resolve() / "tokenizer.json"
    io.atomic_write_text(target, "{}")
    tmp_name = str(target.parent / f".tokenizer.json.tmp-{os.getpid()}")
    assert synced == [("fsync", tmp_name), ("replace", str(target)), ("fsync", str(target.parent))]
    assert target.read_text() == "{}"


def test_atomic_write_text_failure_leaves_no_temporary(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        io.atomic_write_text(tmp_path / "stats.json", "{}")
    assert list(tmp_path.iterdir()) == []
