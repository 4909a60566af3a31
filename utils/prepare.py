"""`train.py prepare`: raw corpora -> cleaned, deduplicated, shuffled, split zstd parquet shards + stats.json.

Two passes in bounded memory. Pass 1 streams every corpus through its reader and the cleaning rules, spools the
kept rows to temporary parquet chunks, and remembers per row only a source id, an exact hash and the LSH band keys
(computed on a worker thread; numpy releases the GIL). Dedup then runs on those arrays, a seeded permutation
assigns every surviving row a shard and a slot, and pass 2 scatters the spool into per-shard buckets that are
sorted into their final order. Everything is built in a temporary sibling directory renamed into place at the end.

Dedup compares a row's prompt and response, except that an instruction many rows share (instruction data: one task
description before each input) is left out and the rest compared among rows of that instruction
(`_SharedInstructions`). stats.json and the table count records read, the rows they became (an HC3 question is one
row per answer) and the rows kept, with the drops of each by reason.

Plain prose (the `text` format) is cleaned by its own rules and each document is split into pieces of at most
`max_doc_chars` characters, one row each: prompt = the piece's first line, response = the rest, so that the
pretraining document `prompt + "\n" + response` is the piece itself (utils/cleaning.py `text_fields`). The pieces of
one document share a document id, and the split keeps them together: no document has pieces in two splits.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from utils.cleaning import CleanConfig, clean_record, normalize_punctuation, normalize_text, split_document, text_fields
from utils.corpora import FILTER_REASONS, READERS, ReaderOptions, Record, Tally, is_blank_file, list_files, read_file
from utils.dedup import DedupConfig, chunk_keys, first_occurrence, instruction_salt, near_duplicates
from utils.io import atomic_dir, write_json
from utils.progress import progress_bar

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
SPLITS = ("train", "valid", "test")
SCHEMA = pa.schema([("prompt", pa.string()), ("response", pa.string()), ("source", pa.string())])


@dataclass
class PrepareConfig:
    seed: int = 23333
    split: tuple[float, float, float] = (0.98, 0.01, 0.01)
    shard_rows: int = 100_000
    chunk_rows: int = 20_000
    chunk_chars: int = 4_000_000  # a spool chunk also ends at this many characters (text pieces are long rows)
    worker: str = "thread"      # where chunks are hashed and spooled: "thread", "process" or "inline"
    multi_turn: str = "first"   # records with history: "first" turn only, every turn as its own row, or "drop"
    overwrite: bool = False
    skip_bad_files: bool = False  # a directory's unreadable / foreign files: skipped and counted, not an error
    read: ReaderOptions = field(default_factory=ReaderOptions)
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def __post_init__(self) -> None:
        if len(self.split) != 3 or min(self.split) < 0 or abs(sum(self.split) - 1) > 1e-6:
            raise ValueError(f"split must be three non-negative fractions summing to 1, got {self.split}")
        if self.worker not in ("process", "thread", "inline"):
            raise ValueError(f"worker must be process, thread or inline, got {self.worker!r}")
        if self.multi_turn not in ("first", "turns", "drop"):
            raise ValueError(f"multi_turn must be first, turns or drop, got {self.multi_turn!r}")


def bundled_sources() -> list[tuple[str, Path]]:
    """The question/answer samples of data/samples (the plain-text sample, data/samples/text, is for pretraining
    only: `--corpus text=data/samples/text`; SFT on the default output would learn it as questions and answers)."""
    return [(d.name, d) for d in sorted(SAMPLES.iterdir())
            if d.is_dir() and d.name in READERS and not READERS[d.name].prose]


def single_turns(rec: Record, policy: str) -> list[Record]:
    """The prepared data is single-turn: keep the first (self-contained) turn, every turn, or nothing."""
    if not rec.history:
        return [rec]
    if policy == "drop":
        return []
    turns = [*rec.history, (rec.prompt, rec.response)]
    if policy == "first":
        turns = turns[:1]
    return [Record(q, a, rec.source) for q, a in turns]


def text_rows(raw: Record, clean: CleanConfig, tally: Tally, where: str) -> list[Record]:
    """The rows of one text document (or block of one, `raw.continued`): cleaned (normalize_text) and split
    (split_document) into pieces, each mapped by text_fields. Counted in `tally`: a document cleaned to nothing as
    dropped `empty_text`; pieces, characters, documents split and cuts by kind in `tally.counts`."""
    text = normalize_text(raw.response, clean.normalize)
    if not text:
        if not raw.continued:
            tally.drop("empty_text", where, "nothing but white space and control characters")
        return []
    split = split_document(text, clean.max_doc_chars)
    c = tally.counts
    if raw.continued:  # the reader cut a long document at a line end: a paragraph cut
        c["paragraph_cuts"] += 1
    elif len(split.pieces) > 1:  # (a document read in blocks has more than one piece in its first block)
        c["split_documents"] += 1
    c["pieces"] += len(split.pieces)
    c["characters"] += sum(map(len, split.pieces))
    c["paragraph_cuts"] += split.paragraph
    c["sentence_cuts"] += split.sentence
    c["hard_cuts"] += split.hard
    return [Record(*text_fields(p), raw.source) for p in split.pieces]


def corpus_labels(sources: list[tuple[str, Path]]) -> list[str]:
    """One unique label per source (its stats key and `source` column): the format alone when it occurs once,
    else format:file-or-dir name, with #k appended while two are still equal (same name in other folders)."""
    formats = [n for n, _ in sources]
    labels = [n if formats.count(n) == 1 else f"{n}:{p.name}" for n, p in sources]
    while len(set(labels)) < len(labels):
        labels = [lab if labels.count(lab) == 1 else f"{lab}#{labels[:i].count(lab) + 1}"
                  for i, lab in enumerate(labels)]
    return labels


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_out_dir(out_dir: str | Path, inputs: list[Path]) -> None:
    """Refuse an output directory that replacing (with --overwrite) would destroy what it must not: one that holds
    or lies inside an input, or is the current directory, the repository, the home directory, `/` (or holds one of
    them). Paths are compared resolved, so `..` and symbolic links do not hide an overlap."""
    out = Path(out_dir).expanduser().resolve()
    home = Path(os.path.expanduser("~")).resolve()
    for what, place in (("the filesystem root", Path(out.anchor)), ("the home directory", home),
                        ("the repository", REPO), ("the current directory", Path.cwd().resolve()),
                        ("the bundled samples", SAMPLES.resolve())):
        if _within(place, out):
            raise ValueError(f"--out {out_dir} {'is' if place == out else 'contains'} {what} ({place}): writing "
                             f"there would replace it; give a new or dedicated directory such as data/corpus")
    for inp in inputs:
        real = Path(inp).expanduser().resolve()
        if _within(real, out):
            raise ValueError(f"--out {out_dir} {'is' if real == out else 'contains'} the input {inp}: writing there "
                             f"would replace it; choose an output directory outside every input")
        if _within(out, real):
            raise ValueError(f"--out {out_dir} is inside the input {inp}: its files would be read as input; "
                             f"choose an output directory outside every input")


def _file_problem(name: str, f: Path, cfg: PrepareConfig) -> str | None:
    """Why a corpus file cannot be used (unreadable, or not one readable record of the format), or None."""
    try:
        if is_blank_file(f):
            return None
        probe = Tally()
        records = read_file(name, f, cfg.read, probe)
        first = next(records, None)
        records.close()
    except OSError as e:
        return f"cannot read {f}: {e.strerror or e}"
    if first is None and not FILTER_REASONS & set(probe.dropped):
        problems = "; ".join(f"{e['reason']} at {e['where']}: {e['detail']}" for e in probe.examples[:3])
        return f"no readable {name} record in {f} ({problems or 'no records'})"
    return None


def _validate(sources: list[tuple[str, Path]], cfg: PrepareConfig
              ) -> tuple[list[tuple[str, list[Path]]], list[list[dict]]]:
    """Fail before any work: unknown corpus, missing path, a corpus with nothing readable, or (unless
    skip_bad_files) any file that is unreadable or holds no readable record. Every file is checked first and all
    such problems are named in one error. Returns the plan ([(format, files to read)]) and, per corpus, its bad
    files ({"file", "reason"}), which skip_bad_files leaves out of the plan."""
    plan, bad_files, fatal, skippable = [], [], [], []
    for name, path in sources:
        files = list_files(name, path)  # raises for an unknown name or a missing path
        problems = {f: p for f in files if (p := _file_problem(name, f, cfg)) is not None}
        good = [f for f in files if f not in problems]
        lines = [f"corpus {name}: {p}" for p in problems.values()]
        if not all(is_blank_file(f) for f in good):
            skippable += lines
        elif problems:  # skipping the bad files would leave nothing of this corpus
            fatal += lines
        else:
            fatal.append(f"corpus {name}: every file under {path} is empty")
        bad_files.append([{"file": str(f), "reason": p} for f, p in problems.items()])
        plan.append((name, good if cfg.skip_bad_files else files))
    errors = fatal + ([] if cfg.skip_bad_files else skippable)
    if errors:
        hint = " (pass --skip-bad-files to skip such files and count them in stats.json)" \
            if skippable and not cfg.skip_bad_files else ""
        if len(errors) == 1:
            raise ValueError(errors[0] + hint)
        raise ValueError(f"{len(errors)} problems with the corpora{hint}:\n  " + "\n  ".join(errors))
    return plan, bad_files


def _keys(prompts: list[str], responses: list[str], dedup: DedupConfig, salt: np.ndarray | None = None):
    """Dedup keys of a chunk (exact [n], bands [n, b], has [n]); zeros for exact when exact dedup is off."""
    exact, bands, has = chunk_keys(prompts, responses, dedup, salt)
    return np.zeros(len(prompts), dtype=np.uint64) if exact is None else exact, bands, has


def _spool_chunk(path: Path, prompts: list[str], responses: list[str], dedup: DedupConfig,
                 key_prompts: list[str] | None = None, salt: np.ndarray | None = None):
    """Worker side of pass 1: write one spool chunk and return its dedup keys (of `key_prompts`, the prompts as
    dedup sees them, when given)."""
    pq.write_table(pa.table({"prompt": prompts, "response": responses}, schema=SCHEMA.remove(2)), path,
                   compression="lz4")
    return _keys(prompts if key_prompts is None else key_prompts, responses, dedup, salt)


MAX_SHARED_INSTRUCTIONS = 1 << 16  # instructions remembered as shared across chunks (a chunk's own are always used)


class _SharedInstructions:
    """Which instructions dedup leaves out (DedupConfig.instruction_repeats): those that `repeats` rows of one spool
    chunk share, remembered for the later chunks. Streaming and deterministic: a chunk is judged when it is flushed,
    in order. An instruction is left out of a row's prompt only where the cleaned prompt still starts with it (and
    has something after it); the row's keys are then salted with the instruction, so its rest is compared only with
    the rest of rows of the same instruction."""

    def __init__(self, repeats: int, clean: CleanConfig):
        self.repeats, self.clean = repeats, clean
        self.known: dict[str, tuple[str, int]] = {}  # raw instruction -> (its cleaned form, salt)

    def _entry(self, instruction: str) -> tuple[str, int]:
        if (entry := self.known.get(instruction)) is None:
            cleaned = normalize_punctuation(instruction) if self.clean.normalize else instruction.strip()
            entry = (cleaned + "\n", instruction_salt(instruction))
            if len(self.known) < MAX_SHARED_INSTRUCTIONS:
                self.known[instruction] = entry
        return entry

    def view(self, prompts: list[str], instructions: list[str]) -> tuple[list[str] | None, np.ndarray | None]:
        """(the prompts as dedup sees them, the salts), or (None, None) when no row leaves its instruction out."""
        if not self.repeats or not any(instructions):
            return None, None
        counts = Counter(instructions)
        shared = {i for i, c in counts.items() if i and (c >= self.repeats or i in self.known)}
        if not shared:
            return None, None
        out, salt = list(prompts), np.zeros(len(prompts), dtype=np.uint64)
        for k, (prompt, instruction) in enumerate(zip(prompts, instructions)):
            if instruction in shared:
                prefix, key = self._entry(instruction)
                if len(prompt) > len(prefix) and prompt.startswith(prefix):
                    out[k], salt[k] = prompt[len(prefix):], key
        return (out, salt) if salt.any() else (None, None)


class _Spool:
    """Pass-1 sink: buffers cleaned rows; a worker writes each chunk and hashes it while the reader goes on. A thread
    overlaps where numpy releases the GIL; a (spawned) process shares no GIL but pickles every chunk and needs an
    importable __main__ (not `python - < script`); which pays depends on the cores free (bench/README.md)."""

    def __init__(self, tmp: Path, cfg: PrepareConfig, n_sources: int, track_docs: bool = False):
        self.tmp, self.cfg = tmp, cfg
        self.prompts: list[str] = []
        self.responses: list[str] = []
        self.files: list[Path] = []
        self.parts: list[Future] = []
        self.source_ids: list[np.ndarray] = []
        self.dtype = np.uint8 if n_sources < 256 else np.uint16
        self.current: list[int] = []
        self.chars = 0
        self.track_docs = track_docs  # keep a document id per row (text corpora: the split keeps a document whole)
        self.doc_ids: list[np.ndarray] = []
        self.docs: list[int] = []
        self.instructions: list[str] = []
        self.shared = _SharedInstructions(cfg.dedup.instruction_repeats, cfg.clean)
        self.left_out = np.zeros(n_sources, dtype=np.int64)  # rows per source compared without their instruction
        self.pool = (ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) if cfg.worker == "process"
                     else ThreadPoolExecutor(1) if cfg.worker == "thread" else None)

    def add(self, rec: Record, source_id: int, doc: int = 0) -> None:
        self.prompts.append(rec.prompt)
        self.responses.append(rec.response)
        self.current.append(source_id)
        self.instructions.append(rec.instruction)
        if self.track_docs:
            self.docs.append(doc)
        self.chars += len(rec.prompt) + len(rec.response)
        if len(self.prompts) >= self.cfg.chunk_rows or self.chars >= self.cfg.chunk_chars:
            self.flush()

    def flush(self) -> None:
        if not self.prompts:
            return
        if len(self.parts) >= 2:
            self.parts[-2].result()  # at most two chunks in flight: memory stays flat
        path = self.tmp / f"spool-{len(self.files):05d}.parquet"
        self.files.append(path)
        self.source_ids.append(np.asarray(self.current, dtype=self.dtype))
        if self.track_docs:
            self.doc_ids.append(np.asarray(self.docs, dtype=np.int64))
        key_prompts, salt = self.shared.view(self.prompts, self.instructions)
        if salt is not None:
            self.left_out += np.bincount(self.source_ids[-1][salt != 0], minlength=len(self.left_out))
        args = (path, self.prompts, self.responses, self.cfg.dedup, key_prompts, salt)
        if self.pool:
            self.parts.append(self.pool.submit(_spool_chunk, *args))
        else:
            done: Future = Future()
            done.set_result(_spool_chunk(*args))
            self.parts.append(done)
        self.prompts, self.responses, self.current, self.docs, self.instructions = [], [], [], [], []
        self.chars = 0

    def arrays(self):
        self.flush()
        # no row survived cleaning: keys of an empty chunk, so dedup and the split run on empty arrays of the
        # right shapes and the output is empty splits plus stats that show every drop
        parts = [f.result() for f in self.parts] or [_keys([], [], self.cfg.dedup)]
        self.close()
        self.parts = []  # (the futures held the keys too)
        near = self.cfg.dedup.near
        docs = np.concatenate([np.empty(0, np.int64), *self.doc_ids]) if self.track_docs else None
        exact = np.concatenate([p[0] for p in parts])
        has = np.concatenate([p[2] for p in parts]) if near else None
        # the band keys stay in their chunks (near_duplicates takes them so): no second copy of the largest array
        bands = [p[1] for p in parts] if near else None
        return np.concatenate([np.empty(0, self.dtype), *self.source_ids]), exact, bands, has, docs

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)


def release_free_memory() -> None:
    """Give the C heap's free memory back to the OS (glibc's malloc_trim; elsewhere nothing): freed key arrays
    otherwise stay in the RSS under the memory that pass 2 allocates."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _assign(n: int, cfg: PrepareConfig, groups: np.ndarray | None = None
            ) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """Rank of every kept row in a seeded permutation, and (split, first rank, row count) per split. The split
    sizes are exact fractions of n, so they do not vary with the draw.

    With `groups` (a document id per kept row, equal ids adjacent) where some document has several rows (the pieces
    of a text document), the documents are drawn instead: in a seeded order, each goes to the split its middle row
    falls in, so every split holds whole documents and its size is off the exact fraction by less than a document;
    the rows of each split are then shuffled. Without such a document, the plain permutation above (same output as
    before documents were tracked)."""
    rng = np.random.default_rng(cfg.seed)
    n_valid, n_test = round(n * cfg.split[1]), round(n * cfg.split[2])
    sizes = (n - n_valid - n_test, n_valid, n_test)
    if groups is not None and n > 1 and bool((groups[1:] == groups[:-1]).any()):
        gid = np.cumsum(np.r_[True, groups[1:] != groups[:-1]]) - 1
        gsize = np.bincount(gid)
        order = rng.permutation(len(gsize))
        middle = np.empty(len(gsize), dtype=np.float64)
        middle[order] = np.cumsum(gsize[order]) - gsize[order] / 2
        split_of = np.searchsorted([sizes[0], sizes[0] + sizes[1]], middle, side="right")[gid]
        rows = np.lexsort((rng.permutation(n), split_of))  # by split, shuffled inside each
        rank = np.empty(n, dtype=np.int64)
        rank[rows] = np.arange(n)
        sizes = tuple(int(c) for c in np.bincount(split_of, minlength=3))
    else:
        rank = rng.permutation(n)
    bounds, start = [], 0
    for name, size in zip(SPLITS, sizes):
        bounds.append((name, start, size))
        start += size
    return rank, bounds


def _write_shards(tmp: Path, out: Path, spool_files: list[Path], keep: np.ndarray, sources: np.ndarray,
                  names: list[str], cfg: PrepareConfig, docs: np.ndarray | None = None) -> dict[str, int]:
    """Pass 2: scatter spooled rows into per-shard buckets by rank, then sort each bucket into its shard."""
    rank_of_kept, bounds = _assign(int(keep.sum()), cfg, None if docs is None else docs[keep])
    rank = np.full(len(keep), -1, dtype=np.int64)
    rank[keep] = rank_of_kept
    shard_of: list[tuple[str, int, int]] = []  # (split, shard index, first rank) in rank order
    for split, start, size in bounds:
        for s, first in enumerate(range(start, start + max(size, 1), cfg.shard_rows)):
            shard_of.append((split, s, first))
    firsts = np.array([f for _, _, f in shard_of])
    bucket_schema = SCHEMA.append(pa.field("rank", pa.int64()))
    writers: dict[int, pq.ParquetWriter] = {}
    source_names = np.array(names, dtype=object)
    offset = 0
    for path in spool_files:
        table = pq.read_table(path)
        n = table.num_rows
        r, src = rank[offset:offset + n], sources[offset:offset + n]
        offset += n
        rows = np.flatnonzero(r >= 0)
        shard = np.searchsorted(firsts, r[rows], side="right") - 1
        for s in np.unique(shard):
            sel = rows[shard == s]
            part = pa.table({"prompt": table["prompt"].take(sel), "response": table["response"].take(sel),
                             "source": pa.array(source_names[src[sel]], pa.string()), "rank": pa.array(r[sel])},
                            schema=bucket_schema)
            if s not in writers:
                writers[s] = pq.ParquetWriter(tmp / f"bucket-{s:05d}.parquet", bucket_schema, compression="lz4")
            writers[s].write_table(part)
        path.unlink()
    for w in writers.values():
        w.close()
    counts = dict.fromkeys(SPLITS, 0)
    for s, (split, idx, _) in enumerate(shard_of):
        bucket = tmp / f"bucket-{s:05d}.parquet"
        if bucket.exists():
            table = pq.read_table(bucket)
            table = table.take(pc.sort_indices(table["rank"])).drop_columns(["rank"])
            bucket.unlink()
        else:
            table = SCHEMA.empty_table()
        pq.write_table(table, out / f"{split}-{idx:05d}.parquet", compression="zstd")
        counts[split] += table.num_rows
    return counts


def prepare_corpora(sources: list[tuple[str, str | Path]] | None, out_dir: str | Path,
                    config: PrepareConfig | None = None, progress: bool = False) -> dict:
    """Prepare `sources` ([(corpus format, file or dir)], default: the bundled samples) into `out_dir`.
    Returns the stats that are also written to `out_dir/stats.json`."""
    cfg = config or PrepareConfig()
    out_dir = Path(out_dir)
    sources = [(n, Path(p)) for n, p in sources] if sources else bundled_sources()
    check_out_dir(out_dir, [p for _, p in sources])
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite / --overwrite to replace it)")
    plan, skipped = _validate(sources, cfg)
    labels = corpus_labels(sources)
    tallies = [Tally() for _ in plan]
    times, rows_made = [0.0] * len(plan), [0] * len(plan)
    t_start = time.perf_counter()
    prose = [READERS[name].prose for name, _ in plan]
    doc = -1  # a running document id: every row of a question/answer corpus, or every text document, gets one
    with atomic_dir(out_dir) as tmp:
        spool = _Spool(tmp, cfg, len(plan), track_docs=any(prose))
        bar = progress_bar(transient=True) if progress else None
        task = bar.add_task("reading", total=None) if bar else None
        if bar:
            bar.start()
        try:
            for i, (name, files) in enumerate(plan):
                t0, tally = time.perf_counter(), tallies[i]
                if bar:
                    bar.update(task, description=f"reading {labels[i]}")
                for f in files:
                    for n, raw in enumerate(read_file(name, f, cfg.read, tally)):
                        if bar and n % 2048 == 0:
                            bar.update(task, completed=sum(t.read for t in tallies))
                        if prose[i]:  # none of the question/answer rules: see text_rows
                            doc += not raw.continued
                            for rec in text_rows(raw, cfg.clean, tally, str(f)):
                                spool.add(rec, i, doc)
                                rows_made[i] += 1
                            continue
                        turns = single_turns(raw, cfg.multi_turn)
                        if not turns:
                            tally.drop("multi_turn", str(f), "multi-turn record dropped (multi_turn=drop)")
                        rows_made[i] += len(turns)
                        for rec in turns:
                            reason = clean_record(rec, name, cfg.clean)
                            if reason:
                                tally.drop(reason, str(f), rec.prompt[:60])
                            else:
                                doc += 1
                                spool.add(rec, i, doc)
                times[i] = time.perf_counter() - t0
            sources_arr, exact, bands, has, docs = spool.arrays()
        finally:
            spool.close()
            if bar:
                bar.stop()
        t_dedup = time.perf_counter()
        keep = first_occurrence(exact) if cfg.dedup.exact else np.ones(len(exact), dtype=bool)
        dup_exact = ~keep
        dup_near = near_duplicates(bands, keep & has) if cfg.dedup.near else np.zeros_like(keep)
        keep &= ~dup_near
        del exact, bands, has  # the keys are done with before pass 2 allocates its own
        release_free_memory()
        for i, tally in enumerate(tallies):
            mine = sources_arr == i
            for reason, mask in (("duplicate", dup_exact), ("near_duplicate", dup_near)):
                if c := int((mask & mine).sum()):
                    tally.dropped[reason] += c
        t_write = time.perf_counter()
        counts = _write_shards(tmp, tmp, spool.files, keep, sources_arr, labels, cfg, docs)
        stats = {
            "corpora": {labels[i]: {
                "format": name, "files": [str(f) for f in files], "read": tallies[i].read, "rows": rows_made[i],
                "kept": int((keep & (sources_arr == i)).sum()), "dropped": dict(tallies[i].dropped.most_common()),
                "near_duplicates": tallies[i].dropped["near_duplicate"],
                "dedup_without_instruction": int(spool.left_out[i]),
                **(_text_stats(tallies[i]) if prose[i] else {}),
                "skipped_files": skipped[i],
                "seconds": round(times[i], 3), "examples": tallies[i].examples,
            } for i, (name, files) in enumerate(plan)},
            "splits": counts,
            "total": {"read": sum(t.read for t in tallies), "rows": sum(rows_made), "kept": int(keep.sum()),
                      "near_duplicates": int(dup_near.sum()),
                      "skipped_files": sum(len(s) for s in skipped),
                      "seconds": round(time.perf_counter() - t_start, 3),
                      "dedup_seconds": round(t_write - t_dedup, 3),
                      "write_seconds": round(time.perf_counter() - t_write, 3)},
            "config": json.loads(json.dumps(asdict(cfg), default=str)),
        }
        write_json(tmp / "stats.json", stats)
    return stats




def _text_stats(tally: Tally) -> dict:
    """What stats.json says of a text corpus beyond read / kept / dropped: `read` counts documents, `kept` and the
    duplicate drops count pieces."""
    c = tally.counts
    return {"documents": tally.read, "pieces": c["pieces"], "characters": c["characters"],
            "split_documents": c["split_documents"],
            "cuts": {"paragraph": c["paragraph_cuts"], "sentence": c["sentence_cuts"], "hard": c["hard_cuts"]}}


# drops of a row (a record's question/answer pair, a text piece); every other reason drops a whole record
ROW_REASONS = ("translation", "table", "short_prompt", "short_response", "too_long", "duplicate", "near_duplicate")


def _dropped(c: dict, rows: bool) -> dict[str, int]:
    return {r: n for r, n in c["dropped"].items() if (r in ROW_REASONS) == rows}


def print_stats(stats: dict) -> None:
    """Per corpus: the records read, the rows they became (an HC3 question: one row per answer; --multi-turn turns:
    one per turn; a text document: one per piece) and the rows kept. records read - records dropped = the records
    that became rows; rows - rows dropped = rows kept (near-duplicates are among the rows dropped)."""
    from rich.console import Console
    from rich.table import Table
    table = Table(title="prepare: records read -> rows -> rows kept")
    for col in ("corpus", "records\nread", "records\ndropped", "rows", "rows\ndropped", "near-\nduplicates",
                "rows\nkept", "seconds"):
        table.add_column(col, justify="left" if col == "corpus" else "right")
    totals = [0, 0]
    for name, c in stats["corpora"].items():
        drops = [sum(_dropped(c, rows).values()) for rows in (False, True)]
        totals = [a + b for a, b in zip(totals, drops)]
        table.add_row(name, f"{c['read']:,}", f"{drops[0]:,}", f"{c['rows']:,}", f"{drops[1]:,}",
                      f"{c['near_duplicates']:,}", f"{c['kept']:,}", f"{c['seconds']:.1f}")
    t = stats["total"]
    table.add_row("total", f"{t['read']:,}", f"{totals[0]:,}", f"{t['rows']:,}", f"{totals[1]:,}",
                  f"{t['near_duplicates']:,}", f"{t['kept']:,}", f"{t['seconds']:.1f}", style="bold")
    console = Console()
    console.print(table)
    for name, c in stats["corpora"].items():
        parts = [f"{what} " + ", ".join(f"{r} {n:,}" for r, n in d.items())
                 for what, d in (("records", _dropped(c, False)), ("rows", _dropped(c, True))) if d]
        if parts:
            console.print(f"{name} dropped: {'; '.join(parts)}", markup=False, highlight=False, soft_wrap=True)
    for name, c in stats["corpora"].items():
        used = c["read"] - sum(_dropped(c, False).values())
        if c["rows"] > used and "pieces" not in c:  # (text corpora: the documents -> pieces line below)
            why = {"hc3": f"one row per answer, --hc3-answers {stats['config']['read']['hc3_answers']}"}.get(
                c["format"], "one row per turn, --multi-turn turns")
            console.print(f"{name}: {used:,} records became {c['rows']:,} rows ({why})", markup=False,
                          highlight=False)
        if n := c.get("dedup_without_instruction"):
            console.print(f"{name}: {n:,} rows share their instruction with others; dedup compared their input and "
                          f"response under that instruction (--instruction-repeats)", markup=False, highlight=False,
                          soft_wrap=True)
    for name, c in stats["corpora"].items():
        if "pieces" in c:
            cuts = c["cuts"]
            console.print(f"{name}: {c['documents']:,} documents -> {c['pieces']:,} pieces of at most "
                          f"{stats['config']['clean']['max_doc_chars']:,} characters ({c['split_documents']:,} "
                          f"documents split: {cuts['paragraph']:,} cuts at paragraph ends, {cuts['sentence']:,} at "
                          f"sentence ends, {cuts['hard']:,} elsewhere); kept {c['kept']:,} pieces",
                          markup=False, highlight=False)
    console.print("splits: " + ", ".join(f"{k} {v:,}" for k, v in stats["splits"].items()))
    if n := stats["total"].get("skipped_files"):
        console.print(f"skipped {n:,} bad file{'s' if n > 1 else ''} (--skip-bad-files; listed in stats.json):",
                      markup=False, highlight=False)
        for name, c in stats["corpora"].items():
            for bad in c.get("skipped_files", []):
                console.print(f"  {name}: {bad['reason']}", markup=False, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------- CLI

def _corpus_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected FORMAT=PATH, got {text!r}")
    if name not in READERS:
        raise argparse.ArgumentTypeError(f"unknown corpus format {name!r}; known: {', '.join(sorted(READERS))}")
    return name, Path(path)


def _min_len_arg(text: str) -> tuple[str, tuple[int, int]]:
    name, sep, vals = text.partition("=")
    try:
        p, r = (int(v) for v in vals.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CORPUS=PROMPT,RESPONSE, got {text!r}") from None
    return name, (p, r)


def _split_arg(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three fractions like 0.98,0.01,0.01, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions, got {text!r}")
    return parts  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    d, c, r, x = PrepareConfig(), CleanConfig(), ReaderOptions(), DedupConfig()
    parser.add_argument("--corpus", action="append", type=_corpus_arg, default=[], metavar="FORMAT=PATH",
                        help=f"a corpus file or directory (repeatable); formats: {', '.join(sorted(READERS))}. "
                             "None: the bundled samples in data/samples")
    parser.add_argument("--out", type=Path, default=Path("data/corpus"), help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--skip-bad-files", action="store_true",
                        help="skip (and count in stats.json) a directory's unreadable files and files with no "
                             "readable record, instead of stopping with the list of them")
    parser.add_argument("--seed", type=int, default=d.seed, help="shuffle / split seed")
    parser.add_argument("--split", type=_split_arg, default=d.split,
                        help="train,valid,test fractions (text corpora: whole documents are drawn, so the split "
                             "sizes are off by less than a document)")
    parser.add_argument("--shard-rows", type=int, default=d.shard_rows, help="rows per output parquet shard")
    parser.add_argument("--encoding", default=r.encoding, help="input encoding (default: detect UTF-8 / GB18030)")
    parser.add_argument("--text-field", default=r.text_field, metavar="NAME",
                        help="text format: the field (JSON lines, JSON array) or column (parquet) holding a document")
    parser.add_argument("--doc-sep", default=r.doc_sep, metavar="file|blank|LINE",
                        help="text format, .txt / .md files: a file is one document (file), documents are separated "
                             "by blank lines (blank), or by a line that reads LINE (e.g. '<|endoftext|>')")
    parser.add_argument("--max-doc-chars", type=int, default=c.max_doc_chars, metavar="N",
                        help="text format: a longer document is split into pieces of at most N characters, at "
                             "paragraph ends (a longer paragraph at sentence ends, then anywhere), one row each "
                             "(the pretraining packer continues a piece that overflows a row in the next)")
    parser.add_argument("--min-star", type=int, default=r.min_star, help="webtext: minimum answer stars")
    parser.add_argument("--dice", type=float, default=r.dice_threshold,
                        help="baike/medical: title and question this similar (Dice) are not both kept")
    parser.add_argument("--hc3-answers", choices=("human", "chatgpt", "both"), default=r.hc3_answers,
                        help="hc3: which answers become rows")
    parser.add_argument("--min-len", action="append", type=_min_len_arg, default=[], metavar="CORPUS=P,R",
                        help=f"minimum prompt,response characters for a corpus (repeatable); seed defaults "
                             f"{c.min_lengths}, others {c.default_min_lengths} (not the text format)")
    parser.add_argument("--max-len", type=int, default=c.max_len,
                        help="maximum characters per field (question/answer formats; text: --max-doc-chars)")
    parser.add_argument("--overlong", choices=("cut", "drop"), default=c.overlong, help="what to do beyond --max-len")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=c.normalize,
                        help="normalize punctuation and whitespace (text format: Unicode NFC, spaces at line ends, "
                             "runs of blank lines; line breaks and control characters are cleaned either way)")
    parser.add_argument("--worker", choices=("thread", "process", "inline"), default=d.worker,
                        help="where chunks are hashed and spooled while reading goes on")
    parser.add_argument("--multi-turn", choices=("first", "turns", "drop"), default=d.multi_turn,
                        help="records with history: keep the first turn, every turn as a row, or drop them")
    parser.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                        help="exact (normalized hash) duplicate removal")
    parser.add_argument("--near-dedup", action=argparse.BooleanOptionalAction, default=True,
                        help="MinHash-LSH near-duplicate removal")
    parser.add_argument("--threshold", type=float, default=x.threshold, help="MinHash-LSH Jaccard threshold")
    parser.add_argument("--num-perm", type=int, default=x.num_perm, help="MinHash permutations")
    parser.add_argument("--ngram", type=int, default=x.ngram, help="MinHash character shingle length")
    parser.add_argument("--instruction-repeats", type=int, default=x.instruction_repeats, metavar="N",
                        help="an instruction with an input (belle, alpaca; instruct's instruct + query) that N rows "
                             f"of a {PrepareConfig.chunk_rows:,}-row chunk share is left out of what dedup compares: "
                             "the input and response are compared among rows of that instruction; 0: compare whole "
                             "prompts")


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    clean = CleanConfig(normalize=args.normalize, max_len=args.max_len, overlong=args.overlong,
                        max_doc_chars=args.max_doc_chars)
    clean.min_lengths.update(dict(args.min_len))
    return PrepareConfig(
        seed=args.seed, split=args.split, shard_rows=args.shard_rows, multi_turn=args.multi_turn, worker=args.worker,
        overwrite=args.overwrite, skip_bad_files=args.skip_bad_files, clean=clean,
        read=ReaderOptions(encoding=args.encoding, min_star=args.min_star, dice_threshold=args.dice,
                           hc3_answers=args.hc3_answers, text_field=args.text_field, doc_sep=args.doc_sep),
        dedup=DedupConfig(exact=args.dedup, near=args.near_dedup, threshold=args.threshold,
                          num_perm=args.num_perm, ngram=args.ngram, instruction_repeats=args.instruction_repeats))


def main(args: argparse.Namespace) -> None:
    stats = prepare_corpora(args.corpus, args.out, config_from_args(args), progress=True)
    print_stats(stats)
    print(f"wrote {args.out}/{{train,valid,test}}-NNNNN.parquet and {args.out}/stats.json")
