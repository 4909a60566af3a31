"""Files in and out: atomic writes (a crash never leaves a file or directory that looks complete but is not) and
the prepared parquet shards."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists here (one we may not signal counts: it is alive). On Windows signal 0
    is CTRL_C_EVENT, not a probe: every process counts as alive there, so nothing is removed."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # an id no process can have
        return False
    return True


def _stale_siblings(path: Path) -> dict[str, dict[int, Path]]:
    """The `.NAME.tmp-PID` / `.NAME.old-PID` siblings of `path` whose process is gone, by kind and PID."""
    found: dict[str, dict[int, Path]] = {"tmp": {}, "old": {}}
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return found
    for entry in entries:
        for kind in found:
            prefix = f".{path.name}.{kind}-"
            pid = entry.name[len(prefix):]
            if entry.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                found[kind][int(pid)] = Path(entry.path)
    return found


def _clean_stale(path: Path) -> None:
    """Remove what killed runs left beside `path`: temporaries of a process that no longer exists (never a live
    one's). A run killed between its two renames left `path` missing, the previous version in `.NAME.old-PID` and
    the complete, synced new one in `.NAME.tmp-PID` (`.old` is made only after the body finished): that commit is
    completed instead, so no complete version is lost."""
    stale = _stale_siblings(path)
    if not path.exists():
        for pid in sorted(set(stale["tmp"]) & set(stale["old"])):
            if stale["tmp"][pid].is_dir() and not stale["tmp"][pid].is_symlink():
                os.replace(stale["tmp"].pop(pid), path)
                break
    for leftover in (*stale["tmp"].values(), *stale["old"].values()):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (a rename into it, a new file) durable. Where a directory cannot be synced
    (Windows; no read permission on it; some network or FUSE filesystems answer EINVAL) it is passed over."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if os.name == "nt" or e.errno in (errno.EACCES, errno.EPERM, errno.EINVAL):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: str | Path) -> None:
    """One pass over a directory tree: every regular file's data, then the directory itself (subdirectories
    first), so that after a crash a renamed-into-place directory holds its files in full, never empty or short."""
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _fsync_tree(entry.path)
            elif entry.is_file(follow_symlinks=False):
                fd = os.open(entry.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory `.NAME.tmp-PID`; on success its files and itself are fsynced and it
    replaces `path` in one rename (an old `path` is moved aside to `.NAME.old-PID` first and removed after), and the
    parent is fsynced, so a power cut never leaves a `path` that looks complete but is not. On error the temporary
    directory is removed and `path` is untouched. Temporaries that runs killed before they could clean up (their
    PID no longer exists) are removed first; a live process's never are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    for mine in (tmp, old):  # our own, from an earlier failed call in this process
        shutil.rmtree(mine, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    moved = path.exists()
    if moved:
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: str | Path, missing: str = "not found") -> Any:
    """A JSON file's content; a missing, unreadable or invalid file raises an error that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary sibling, fsync it, rename it over `path` and fsync the directory: after a crash
    `path` holds the old text or the new, in full. A failed write (a full disk) leaves no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def find_shards(data_dir: str | Path, split: str) -> list[Path]:
    """The `{split}-NNNNN.parquet` shards of a prepared data directory, in order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    files = sorted(data_dir.glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no {split}-NNNNN.parquet shards in {data_dir} (run `train.py prepare` first)")
    return files


def iter_parquet(files: Sequence[Path], columns: Sequence[str], batch_size: int = 4096
                 ) -> Iterator[dict[str, list]]:
    """Column batches of the given parquet files; unreadable files and missing columns are errors naming the file."""
    for path in files:
        try:
            pf = pq.ParquetFile(path)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; it has {pf.schema_arrow.names}")
            for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns)):
                yield batch.to_pydict()
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: cannot read parquet file ({e})") from e


def num_rows(files: Sequence[Path]) -> int:
    total = 0
    for path in files:
        try:
            total += pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: cannot read parquet file ({e})") from e
    return total
