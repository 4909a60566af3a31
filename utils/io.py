"""Files in and out: atomic writes (a crash never leaves a file or directory that looks complete but is not) and
the prepared parquet shards."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename (an old `path` is moved
    aside first and removed after). On error the temporary directory is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
