"""Training data: a packed, resumable pretraining stream over a cached token file, packed SFT examples, and packed
preference pairs for DPO (each pair's chosen and rejected sequences side by side in one row).

Pretraining documents (`prompt + "\\n" + response + <eos>`; a piece of prose with no second line is the prompt
alone) are tokenized once into a memory-mapped token file with document offsets, cached under a key of (data files,
tokenizer, format version). SFT conversations are rendered with a chat template segment by segment, so the label
mask is exact: only assistant answers and their end-of-turn token are learned (unless `train_on_prompt`).

The loaders pack variable-length items into fixed-capacity rows with the same best-fit packer (nanochat style): a
row is filled with the largest buffered item that still fits. Pretraining rows are filled exactly (no padding): the
item that does not fit is split at the row's end and continued at the start of the next row, so no token is lost
(but the last partial row of an epoch, counted); SFT and pair rows never cut an item and pad the remainder, and
carry `segment_ids` so attention stays inside each sequence.

Resumption is exact because everything an epoch yields is a pure function of (seed, epoch): the item order is a
permutation drawn from `seed + epoch`, the packing is deterministic, and the loader state is just
(epoch, global rows consumed). The epochs' rows form one stream (an epoch's last batch is completed with the next
epoch's first rows, so no row is skipped), dealt out interleaved (rank r of W takes rows r, r+W, ... of each batch
stride), so the rows consumed after k batches are always a prefix of that stream.
"""
from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.generation import resolve_template
from model.loss import IGNORE_INDEX  # the label the loss skips
from utils.cleaning import text_of
from utils.io import atomic_dir, find_shards, iter_parquet, num_rows
from utils.pairs import Pair
from utils.progress import progress_bar
from utils.templates import (
    ENCODE_BATCH,
    Record,
    SFTExamples,
    encode_segments,
    ends_turn_with_token,
    to_messages,
    tokenize_sft,
)

PAD_SEGMENT = -1  # segment id of the padding at the end of a packed SFT row
CACHE_FORMAT_VERSION = 3  # bump when the document format or the cache layout changes


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining token cache
# ---------------------------------------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's serialized form (its tokenizer.json content)."""
    for obj in (getattr(tokenizer, "backend", None), tokenizer):
        if obj is not None and callable(getattr(obj, "to_str", None)):
            return hashlib.sha256(obj.to_str().encode()).hexdigest()
    raise TypeError(f"cannot fingerprint tokenizer {type(tokenizer).__name__}: it exposes no to_str()")


def cache_key(files: Sequence[Path], tokenizer: Any) -> str:
    """Hash of (format version, data file names + sizes + mtimes, tokenizer.json content)."""
    h = hashlib.sha256(f"v{CACHE_FORMAT_VERSION}\n".encode())
    for path in files:
        st = Path(path).stat()
        h.update(f"{Path(path).name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:20]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


@dataclass
class TokenCache:
    """Documents as one memory-mapped token array; document d is tokens[offsets[d]:offsets[d + 1]]."""

    path: Path
    tokens: np.ndarray
    offsets: np.ndarray  # int64 [n_docs + 1]
    meta: dict

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def chars_per_token(self) -> float:
        return self.meta["n_chars"] / self.meta["n_tokens"]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, d: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[d]:self.offsets[d + 1]])

    @classmethod
    def load(cls, path: Path) -> "TokenCache":
        meta = json.loads((path / "meta.json").read_text())
        offsets = np.load(path / "offsets.npy")
        tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["n_tokens"],))
        return cls(path, tokens, offsets, meta)


def _write_token_cache(files: Sequence[Path], tokenizer: Any, out: Path, key: str) -> None:
    """Tokenize every document of `files` into `out/` (tokens.bin, offsets.npy, meta.json), streaming in batches."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    lengths: list[np.ndarray] = []
    n_chars = n_null = 0
    with open(out / "tokens.bin", "wb") as f, progress_bar() as progress:
        task = progress.add_task(f"tokenizing {files[0].name.split('-')[0]} documents", total=num_rows(files))
        for cols in iter_parquet(files, ("prompt", "response")):
            docs = []
            for p, r in zip(cols["prompt"], cols["response"]):
                if p is None or r is None:
                    n_null += 1
                else:
                    docs.append(text_of(p, r))
            progress.advance(task, len(cols["prompt"]))
            if not docs:
                continue
            ids = tokenizer.encode_batch(docs, special=False)  # marker text in a document is plain text
            lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lens.sum()))
            f.write(np.insert(flat, np.cumsum(lens), np.array(eos, dtype=dtype)).tobytes())  # eos after each doc
            lengths.append(lens + 1)
            n_chars += sum(map(len, docs))
    if not lengths:
        raise ValueError(f"no documents in {', '.join(str(p) for p in files)} (empty corpus)")
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    np.save(out / "offsets.npy", offsets)
    meta = {"version": CACHE_FORMAT_VERSION, "key": key, "files": [p.name for p in files],
            "n_docs": len(offsets) - 1, "n_tokens": int(offsets[-1]), "n_chars": n_chars, "skipped_null": n_null,
            "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": eos}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def build_token_cache(files: Sequence[Path], tokenizer: Any, cache_dir: str | Path, name: str) -> TokenCache:
    """Load the token cache of (files, tokenizer), building it first when absent.

    Concurrent builders (DDP ranks) serialize on a lock file; the cache is written into a temporary directory
    and renamed into place (utils.io.atomic_dir), so a crash never leaves a half-written cache behind.
    """
    files = [Path(p) for p in files]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(files, tokenizer)
    final = cache_dir / f"{name}-{key}"
    if (final / "meta.json").exists():
        return TokenCache.load(final)
    with open(cache_dir / f".{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "meta.json").exists():
            with atomic_dir(final) as tmp:
                _write_token_cache(files, tokenizer, tmp, key)
    return TokenCache.load(final)


# ---------------------------------------------------------------------------------------------------------------------
# Best-fit packing
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PackPlan:
    """Rows of an epoch: row i holds pieces row_ptr[i]:row_ptr[i+1]; piece p is units starts[p]:starts[p] + takes[p]
    of item items[p]. `order` is the order rows are served in."""

    items: np.ndarray
    starts: np.ndarray
    takes: np.ndarray
    row_ptr: np.ndarray
    order: np.ndarray
    stats: dict = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return len(self.row_ptr) - 1


def best_fit_pack(lengths: np.ndarray, capacity: int, order: Iterable[int], buffer_size: int = 1000,
                  split_items: bool = True, overlap: int = 0) -> PackPlan:
    """Pack items (taken from `order`) into rows of `capacity` units.

    The packer keeps `buffer_size` upcoming items sorted by length and fills a row with the largest one that still
    fits. When none fits: with `split_items`, the longest buffered item fills the rest of the row and is continued
    at the start of the next row (from `overlap` units before the cut; an item longer than a row goes on over as
    many rows as it needs), so every unit is placed and rows are full; a final row the data cannot fill is dropped
    (its units counted). Without `split_items`, the row is closed and the remainder is padding; an item longer than
    a row is an error.
    """
    if split_items and not 0 <= overlap < capacity:
        raise ValueError(f"overlap {overlap} must be in [0, capacity {capacity})")
    if not split_items and len(lengths) and int(np.max(lengths)) > capacity:
        raise ValueError(f"an item of length {int(np.max(lengths))} exceeds the row capacity {capacity}")
    buf: list[tuple[int, int, int]] = []  # (length, arrival, item), sorted
    source = iter(order)
    arrivals = 0
    pieces: list[tuple[int, int, int]] = []  # (item, start, take)
    row_ptr = [0]
    pending: tuple[int, int, int] | None = None  # (item, start, units left) of a split item: it opens the next row
    padded = dropped = total = continued = 0

    def refill() -> None:
        nonlocal arrivals, total
        while len(buf) < buffer_size:
            i = next(source, None)
            if i is None:
                return
            n = int(lengths[i])
            total += n
            bisect.insort(buf, (n, arrivals, int(i)))
            arrivals += 1

    while True:
        refill()
        if not buf and pending is None:
            break
        remaining = capacity
        opens_continued = pending is not None
        if pending is not None:
            i, s, n = pending
            take = min(n, capacity)
            pieces.append((i, s, take))
            remaining -= take
            pending = (i, s + take - overlap, n - take + overlap) if take < n else None
        while remaining > 0:
            refill()
            if not buf:
                break
            j = bisect.bisect_right(buf, (remaining, arrivals, 0)) - 1  # largest item with length <= remaining
            if j >= 0:
                n, _, i = buf.pop(j)
                take = n
            elif split_items:
                n, _, i = buf.pop()
                take = remaining
                pending = (i, take - overlap, n - take + overlap)
            else:
                break
            pieces.append((i, 0, take))
            remaining -= take
        if remaining and split_items:  # data ran out mid-row: its units (less a repeated overlap) are not served
            dropped = capacity - remaining - (overlap if opens_continued else 0)
            del pieces[row_ptr[-1]:]
            break
        padded += remaining
        continued += opens_continued
        row_ptr.append(len(pieces))
    n_rows = len(row_ptr) - 1
    stats = {"rows": n_rows, "capacity": capacity, "units": total, "used": n_rows * capacity - padded,
             "cropped": 0, "padded": padded, "dropped": dropped, "continued": continued,
             "repeated": continued * overlap}
    flat = np.fromiter(chain.from_iterable(pieces), dtype=np.int64, count=3 * len(pieces))
    items, starts, takes = flat.reshape(-1, 3).T.copy()
    return PackPlan(items, starts, takes, np.asarray(row_ptr, dtype=np.int64), np.arange(n_rows), stats)


def packing_report(stats: dict) -> dict[str, float]:
    """Fractions a trainer can log: of all units, how many were cropped (never, since the packer continues a split
    item; kept for comparison with older logs) / dropped (the last partial row); of row capacity, how much padded;
    of rows, how many open with a continued item."""
    units = max(stats["units"], 1)
    rows = max(stats["rows"], 1)
    return {"rows": stats["rows"], "crop_fraction": stats["cropped"] / units,
            "drop_fraction": stats["dropped"] / units, "pad_fraction": stats["padded"] / (rows * stats["capacity"]),
            "continued_fraction": stats["continued"] / rows}


def _gather(flat: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of flat[starts[k]:starts[k] + lens[k]] for all k, in one fancy-indexing read."""
    ends = np.cumsum(lens)
    idx = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(starts - (ends - lens), lens)
    return np.asarray(flat[idx])


def _each_row(parts: Sequence[tuple[PackPlan, np.ndarray]]) -> Iterator[tuple[PackPlan, int]]:
    """(plan, row) for each row of (plan, rows) parts, in turn."""
    return ((plan, int(r)) for plan, rows in parts for r in rows)


def _digest(*arrays: np.ndarray) -> str:
    """A short sha256 of the arrays' bytes (C order), in turn: identifies a loader's data."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------------
class _RowLoader(ABC):
    """Infinite, sharded, resumable iterator over the packed rows of each epoch (see the module docstring)."""

    capacity: int
    split_items: bool  # continue an item that does not fit in the next row (pretraining) instead of padding the row
    overlap = 0  # units a continued item repeats from the end of its previous piece

    def __init__(self, lengths: np.ndarray, batch_size: int, rank: int, world_size: int, seed: int,
                 buffer_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = lengths
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.buffer_size = seed, buffer_size
        self.epoch = 0
        self.row = 0  # rows consumed in this epoch, summed over all ranks
        self._plans: dict[int, PackPlan] = {}  # by epoch: the current one and its neighbours
        self._eval_plan: PackPlan | None = None

    # --- what subclasses provide
    @abstractmethod
    def _fingerprint(self) -> str:
        """Identifies the data and packing, so a saved position is never applied to other data."""

    @abstractmethod
    def _batch(self, parts: Sequence[tuple[PackPlan, np.ndarray]]) -> dict[str, torch.Tensor]:
        """The tensors of the given packed rows: the rows of each (plan, rows) part, in turn."""

    # --- epochs
    def plan(self, epoch: int | None = None) -> PackPlan:
        """The packed rows of an epoch: items permuted with `seed + epoch`, packed, rows shuffled."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._plans:
            rng = np.random.default_rng(self.seed + epoch)
            plan = best_fit_pack(self.lengths, self.capacity, rng.permutation(len(self.lengths)),
                                 self.buffer_size, self.split_items, self.overlap)
            plan.order = rng.permutation(plan.n_rows)
            self._plans = {e: p for e, p in self._plans.items() if abs(e - epoch) <= 1} | {epoch: plan}
        return self._plans[epoch]

    @property
    def batches_per_epoch(self) -> int:
        """Whole batches each rank gets in the current epoch (its last rows go into a batch that the next epoch's
        first rows complete)."""
        return self.plan().n_rows // (self.batch_size * self.world_size)

    @property
    def rows_per_epoch(self) -> int:
        """Packed rows in the current epoch, over all ranks."""
        return self.plan().n_rows

    @property
    def row_tokens(self) -> int:
        """Positions of a served row (its input_ids' width): what a token budget counts (trainer/batching.py)."""
        return self.capacity

    def probe_batch(self, rows: int) -> dict[str, torch.Tensor]:
        """A batch of the current epoch's first `rows` rows, for measuring a step; the position does not move."""
        plan = self.plan()
        return self._batch([(plan, plan.order[:rows])])

    @property
    def report(self) -> dict[str, float]:
        """Packing efficiency of the current epoch."""
        rep = packing_report(self.plan().stats)
        rep["batches_per_epoch"] = self.batches_per_epoch
        return rep

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self._batch(self._next_rows())

    def _next_rows(self) -> list[tuple[PackPlan, np.ndarray]]:
        """This rank's share of the next batch_size x world_size rows of the stream of epochs, as (plan, rows)
        parts; advances the state. An epoch's last rows are completed with the next epoch's first: no row is
        skipped."""
        stride = self.batch_size * self.world_size
        epoch, row, parts, offset = self.epoch, self.row, [], 0
        while offset < stride:
            plan = self.plan(epoch)
            if plan.n_rows < stride:
                raise ValueError(f"only {plan.n_rows} packed rows in an epoch, fewer than batch_size "
                                 f"{self.batch_size} x world_size {self.world_size}; use less data per batch")
            rows = plan.order[row:row + stride - offset]
            # stream positions rank, rank + world_size, ... of the batch
            parts.append((plan, rows[(self.rank - offset) % self.world_size::self.world_size]))
            offset, row = offset + len(rows), row + len(rows)
            if row == plan.n_rows:
                epoch, row = epoch + 1, 0
        self.epoch, self.row = epoch, row
        return parts

    def eval_batches(self, max_rows: int | None = None,
                     rows_per_batch: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Finite pass over the split in file order (no shuffling): this rank's share, its first `max_rows` rows (all
        when None), `rows_per_batch` at a time (default the loader's batch size); the last batch may be smaller.
        Rows beyond a multiple of world_size are left out so all ranks yield the same number of batches."""
        plan = self.eval_plan()
        n = plan.n_rows // self.world_size * self.world_size
        mine = np.arange(self.rank, n, self.world_size)[:max_rows]
        size = rows_per_batch or self.batch_size
        for start in range(0, len(mine), size):
            yield self._batch([(plan, mine[start:start + size])])

    def eval_plan(self) -> PackPlan:
        """The whole split packed in file order (evaluation's rows)."""
        if self._eval_plan is None:
            self._eval_plan = best_fit_pack(self.lengths, self.capacity, range(len(self.lengths)), self.buffer_size,
                                            self.split_items, self.overlap)
        return self._eval_plan

    # --- state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed, "data": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position. The data, seed and packing must match; batch size and world size may change
        (the run continues at the same global row of the same epoch)."""
        for key in ("seed", "data"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(f"loader state does not match this data: {key} is {state.get(key)!r} in the "
                                 f"saved state, {self.state_dict()[key]!r} here")
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


class _PaddedLoader(_RowLoader):
    """Rows of `capacity` positions packed with whole sequences and padded (SFT, pairs); `segment_ids` keep the
    sequences apart (0, 1, ... per row, PAD_SEGMENT on the padding, whose labels are IGNORE_INDEX)."""

    split_items = False
    examples: SFTExamples | PairExamples
    max_seq_len: int
    pad_id: int
    _data_hash: str

    @property
    def report(self) -> dict[str, float]:
        rep = super().report
        rep.update(self.examples.stats)
        return rep

    def _fingerprint(self) -> str:
        return f"{self._data_hash}/len{self.max_seq_len}/buf{self.buffer_size}"

    def _padding(self, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, labels, segment_ids) of n_rows rows that are all padding, for `_place` to fill."""
        shape = (n_rows, self.capacity)
        return (np.full(shape, self.pad_id, dtype=np.int64), np.full(shape, IGNORE_INDEX, dtype=np.int64),
                np.full(shape, PAD_SEGMENT, dtype=np.int64))


class PackedLoader(_RowLoader):
    """Pretraining rows of seq_len + 1 tokens cut into input_ids = row[:-1], labels = row[1:]; no padding.

    A document that does not fit the rest of a row goes on at the start of the next row of the plan (rows are then
    shuffled like the others), so no token is lost. Its next part starts with the last token of the part before
    (`overlap` 1): that token is the row's first input, so the next one is predicted, and every token after a
    document's first is a label exactly once. Nothing marks the continuation (the documents carry no BOS, only an
    eos at their end) and positions restart at 0 in every row, as for any pretraining row: attention spans the whole
    row, across the eos between documents (plain causal attention), unless `document_masking`: then each piece of a
    document is a segment of its own (segment_ids; positions restart per piece).
    """

    split_items = True
    overlap = 1

    def __init__(self, cache: TokenCache, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, buffer_size: int = 1000, document_masking: bool = False):
        super().__init__(cache.doc_lengths(), batch_size, rank, world_size, seed, buffer_size)
        self.cache = cache
        self.seq_len = seq_len
        self.document_masking = document_masking
        self.capacity = seq_len + 1
        # the documents' token counts identify the data, not the cache key: a copied data dir (new mtimes, so a
        # rebuilt cache) still resumes
        self._data_hash = _digest(cache.offsets)

    @property
    def chars_per_token(self) -> float:
        return self.cache.chars_per_token

    @property
    def row_tokens(self) -> int:  # a row's seq_len + 1 tokens serve seq_len inputs (and as many labels)
        return self.seq_len

    @property
    def report(self) -> dict[str, float]:
        rep = super().report
        rep.update(docs=self.cache.n_docs, tokens=self.cache.n_tokens, chars_per_token=self.chars_per_token)
        return rep

    def _fingerprint(self) -> str:  # "split": plans that continue documents (saved positions of cropping plans differ)
        return f"{self._data_hash}/len{self.seq_len}/buf{self.buffer_size}/split"

    def _batch(self, parts: Sequence[tuple[PackPlan, np.ndarray]]) -> dict[str, torch.Tensor]:
        starts, takes = [], []
        for plan, rows in parts:
            pieces = np.concatenate([np.arange(plan.row_ptr[r], plan.row_ptr[r + 1]) for r in rows])
            starts.append(self.cache.offsets[plan.items[pieces]] + plan.starts[pieces])
            takes.append(plan.takes[pieces])
        takes = np.concatenate(takes)
        flat = _gather(self.cache.tokens, np.concatenate(starts), takes)
        batch = torch.from_numpy(flat.astype(np.int64)).view(-1, self.capacity)
        out = {"input_ids": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()}
        if self.document_masking:  # pieces are numbered across the batch: a row's pieces differ, as its rows' may not
            pieces = torch.from_numpy(np.repeat(np.arange(len(takes)), takes)).view(-1, self.capacity)
            out["segment_ids"] = pieces[:, :-1].contiguous()
        return out


def pretrain_loader(data_dir: str | Path, tokenizer: Any, split: str, seq_len: int, batch_size: int,
                    rank: int = 0, world_size: int = 1, seed: int = 0, cache_dir: str | Path | None = None,
                    buffer_size: int = 1000, document_masking: bool = False) -> PackedLoader:
    """The packed pretraining stream of one split of a prepared data directory (token cache built on first use)."""
    files = find_shards(data_dir, split)
    cache = build_token_cache(files, tokenizer, cache_dir or Path(data_dir) / ".cache", split)
    return PackedLoader(cache, seq_len, batch_size, rank, world_size, seed, buffer_size, document_masking)


# ---------------------------------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------------------------------
class SFTLoader(_PaddedLoader):
    """Rows of max_seq_len positions packed with whole examples, one segment each."""

    def __init__(self, examples: SFTExamples, pad_id: int, max_seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, buffer_size: int = 1000):
        super().__init__(np.diff(examples.offsets) - 1, batch_size, rank, world_size, seed, buffer_size)
        self.examples, self.pad_id = examples, pad_id
        self.capacity = self.max_seq_len = max_seq_len
        self._data_hash = _digest(examples.tokens, examples.trainable)

    def _batch(self, parts: Sequence[tuple[PackPlan, np.ndarray]]) -> dict[str, torch.Tensor]:
        input_ids, labels, segment_ids = self._padding(sum(len(rows) for _, rows in parts))
        for b, (plan, r) in enumerate(_each_row(parts)):
            pos = 0
            for seg, p in enumerate(range(plan.row_ptr[r], plan.row_ptr[r + 1])):
                pos = _place((input_ids[b], labels[b], segment_ids[b]), pos, *self.examples.example(plan.items[p]),
                             seg)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "segment_ids": torch.from_numpy(segment_ids)}


def _place(row: tuple[np.ndarray, np.ndarray, np.ndarray], pos: int, x: np.ndarray, trainable: np.ndarray,
           segment: int) -> int:
    """Lay the sequence x into a row's (input_ids, labels, segment_ids) from `pos`: inputs x[:-1], labels x[1:] where
    trainable; returns where the next sequence starts."""
    input_ids, labels, segment_ids = row
    end = pos + len(x) - 1
    input_ids[pos:end] = x[:-1]
    labels[pos:end] = np.where(trainable[1:], x[1:], IGNORE_INDEX)
    segment_ids[pos:end] = segment
    return end


def load_sft_records(data_dir: str | Path, split: str) -> list[dict[str, str]]:
    """(prompt, response) records of a prepared split; rows with a null field are skipped."""
    records = []
    for cols in iter_parquet(find_shards(data_dir, split), ("prompt", "response")):
        records += [{"prompt": p, "response": r} for p, r in zip(cols["prompt"], cols["response"])
                    if p is not None and r is not None]
    return records


def sft_loader(records_or_data_dir: str | Path | Sequence[Record], tokenizer: Any, template: Any = None,
               max_seq_len: int = 512, batch_size: int | None = None, tokens_per_batch: int | None = None,
               rank: int = 0, world_size: int = 1, seed: int = 0, skip_overlength: bool = False,
               train_on_prompt: bool = False, split: str = "train", buffer_size: int = 1000) -> SFTLoader:
    """Packed SFT batches from a prepared data directory (its `split`) or in-memory records (see `to_messages`).

    template: a ChatTemplate, a template name, or None for the tokenizer's default. Give either batch_size (rows)
    or tokens_per_batch (rows = tokens_per_batch // max_seq_len).
    """
    if (batch_size is None) == (tokens_per_batch is None):
        raise ValueError("give exactly one of batch_size or tokens_per_batch")
    if batch_size is None:
        batch_size = max(1, tokens_per_batch // max_seq_len)
    template = resolve_template(template, tokenizer)
    if isinstance(records_or_data_dir, (str, Path)):
        records: Sequence[Record] = load_sft_records(records_or_data_dir, split)
        source = f"{records_or_data_dir} ({split})"
    else:
        records, source = records_or_data_dir, "records"
    if not records:
        raise ValueError(f"no SFT records in {source}")
    convs = [to_messages(r, f"{source}[{i}]") for i, r in enumerate(records)]
    examples = tokenize_sft(convs, tokenizer, template, max_seq_len, skip_overlength, train_on_prompt)
    return SFTLoader(examples, tokenizer.pad_id, max_seq_len, batch_size, rank, world_size, seed, buffer_size)


# ---------------------------------------------------------------------------------------------------------------------
# Preference pairs (DPO)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PairExamples:
    """Tokenized preference pairs: pair p is its prompt's tokens, its chosen answer's, then its rejected answer's
    (each answer with its end-of-turn token), at tokens[offsets[p]:offsets[p + 1]]."""

    tokens: np.ndarray  # int32
    offsets: np.ndarray  # int64 [n + 1]
    prompt_lengths: np.ndarray  # int64 [n]
    chosen_lengths: np.ndarray  # int64 [n]
    stats: dict

    @classmethod
    def build(cls, triples: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
              stats: dict) -> "PairExamples":
        """From (prompt, chosen answer, rejected answer) token lists."""
        lengths = np.array([len(p) + len(c) + len(r) for p, c, r in triples], dtype=np.int64)
        tokens = np.fromiter(chain.from_iterable(chain(*t) for t in triples), dtype=np.int32, count=int(lengths.sum()))
        return cls(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   np.array([len(p) for p, _, _ in triples], dtype=np.int64),
                   np.array([len(c) for _, c, _ in triples], dtype=np.int64), stats)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def pair(self, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt, chosen answer, rejected answer) tokens of pair p."""
        s, t = self.offsets[p], self.offsets[p + 1]
        a, b = s + self.prompt_lengths[p], s + self.prompt_lengths[p] + self.chosen_lengths[p]
        return self.tokens[s:a], self.tokens[a:b], self.tokens[b:t]

    def positions(self) -> np.ndarray:
        """Row positions each pair fills: prompt + chosen and prompt + rejected, each one shorter (its inputs)."""
        return np.diff(self.offsets) + self.prompt_lengths - 2


def _last_answer(x: list[int], trainable: list[bool]) -> tuple[list[int], list[int]]:
    """(prompt, answer) of an encoded conversation: the answer is its last run of trainable tokens, the prompt all
    before it; what follows the answer (the template's text after a turn) is left out."""
    end = len(trainable) - trainable[::-1].index(True)
    start = end
    while start > 0 and trainable[start - 1]:
        start -= 1
    return x[:start], x[start:end]


def tokenize_pairs(pairs: Sequence[Pair], tokenizer: Any, template: Any, max_seq_len: int,
                   skip_overlength: bool = False) -> PairExamples:
    """Each pair's two conversations through the chat template, piece by piece as SFT's (`encode_segments`): the
    answer is the last assistant turn with its end-of-turn token (eos for templates without one), the prompt every
    token before it (system, history, question, the assistant's prefix), the same for both answers.

    A sequence (prompt + answer) longer than max_seq_len positions loses its answer's tail (TRL's `keep_start`), or
    the pair is skipped (`skip_overlength`); a pair whose prompt leaves no answer token is skipped. Both counted."""
    template = resolve_template(template, tokenizer)
    append_eos = not ends_turn_with_token(template, tokenizer)
    stats = {"pairs": len(pairs), "truncated": 0, "skipped_overlength": 0, "skipped_long_prompt": 0}
    triples = []
    with progress_bar() as progress:
        task = progress.add_task("tokenizing preference pairs", total=len(pairs))
        for start in range(0, len(pairs), ENCODE_BATCH):
            chunk = pairs[start:start + ENCODE_BATCH]
            convs = [template.pieces(to_messages(pair.record(answer))) for pair in chunk
                     for answer in (pair.chosen, pair.rejected)]
            encoded = encode_segments(tokenizer, convs, append_eos)
            for chosen_conv, rejected_conv in zip(encoded[::2], encoded[1::2]):
                (prompt, chosen), (other, rejected) = _last_answer(*chosen_conv), _last_answer(*rejected_conv)
                assert prompt == other, "the pieces before an answer encode alike"
                room = max_seq_len + 1 - len(prompt)  # answer tokens that fit a sequence
                if max(len(chosen), len(rejected)) > room:
                    outcome = ("skipped_overlength" if skip_overlength else
                               "skipped_long_prompt" if room < 1 else "truncated")
                    stats[outcome] += 1
                    if outcome != "truncated":
                        continue
                triples.append((prompt, chosen[:room], rejected[:room]))
            progress.advance(task, len(chunk))
    if not triples:
        fix = "raise it" + (" or leave out --skip-overlength" if skip_overlength else "")
        raise ValueError(f"no usable preference pairs out of {len(pairs)}: each is too long for --max-seq-length "
                         f"{max_seq_len} ({stats}); {fix}")
    stats["kept"] = len(triples)
    return PairExamples.build(triples, stats)


class PairLoader(_PaddedLoader):
    """Rows of 2 x max_seq_len positions packed with whole pairs, each pair as two sequences side by side: prompt +
    chosen, then prompt + rejected (segments 2k and 2k + 1 of its row: attention stays inside each, positions
    restart), so one forward scores both answers of every pair. Besides SFT's tensors a batch holds `pair_ids` [P]
    (its pairs' indices), `sequence_ids` [B, T] (which of its 2P sequences a position scores: 2p for the chosen
    answer of its p-th pair, 2p + 1 for the rejected; 0 on padding, which scores nothing) and, once
    `precompute_reference` ran, `ref_logps` [P, 2]."""

    def __init__(self, examples: PairExamples, pad_id: int, max_seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, buffer_size: int = 1000):
        super().__init__(examples.positions(), batch_size, rank, world_size, seed, buffer_size)
        self.examples, self.pad_id, self.max_seq_len = examples, pad_id, max_seq_len
        self.capacity = 2 * max_seq_len
        self.reference: np.ndarray | None = None  # [n, 2] reference log-probs (chosen, rejected)
        self._data_hash = _digest(examples.tokens, examples.offsets, examples.prompt_lengths, examples.chosen_lengths)

    def _batch(self, parts: Sequence[tuple[PackPlan, np.ndarray]]) -> dict[str, torch.Tensor]:
        input_ids, labels, segment_ids = self._padding(sum(len(rows) for _, rows in parts))
        sequence_ids = np.zeros_like(input_ids)
        pair_ids = []
        for b, (plan, r) in enumerate(_each_row(parts)):
            pos = 0
            for k, p in enumerate(range(plan.row_ptr[r], plan.row_ptr[r + 1])):
                prompt, *answers = self.examples.pair(plan.items[p])
                for side, answer in enumerate(answers):
                    x = np.concatenate([prompt, answer])
                    trainable = np.arange(len(x)) >= len(prompt)
                    end = _place((input_ids[b], labels[b], segment_ids[b]), pos, x, trainable, 2 * k + side)
                    sequence_ids[b, pos:end] = 2 * len(pair_ids) + side
                    pos = end
                pair_ids.append(plan.items[p])
        batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                 "segment_ids": torch.from_numpy(segment_ids), "sequence_ids": torch.from_numpy(sequence_ids),
                 "pair_ids": torch.tensor(pair_ids, dtype=torch.int64)}
        if self.reference is not None:
            batch["ref_logps"] = torch.from_numpy(self.reference[pair_ids])
        return batch

    def precompute_reference(self, score: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> None:
        """`score(batch)` -> [P, 2] reference log-probs of a batch's pairs, for every pair once (all rows, on every
        rank, in evaluation's packing); every batch after carries them as `ref_logps`."""
        plan, reference = self.eval_plan(), np.zeros((len(self.examples), 2), dtype=np.float32)
        for start in range(0, plan.n_rows, self.batch_size):
            batch = self._batch([(plan, np.arange(start, min(start + self.batch_size, plan.n_rows)))])
            reference[batch["pair_ids"].numpy()] = score(batch).float().cpu().numpy()
        self.reference = reference


def pair_loader(pairs: Sequence[Pair], tokenizer: Any, template: Any = None, max_seq_len: int = 512,
                batch_size: int = 8, rank: int = 0, world_size: int = 1, seed: int = 0,
                skip_overlength: bool = False, buffer_size: int = 1000) -> PairLoader:
    """Packed DPO batches of `pairs` (utils/pairs.py); template: a ChatTemplate, a name, or None for the tokenizer's
    default; max_seq_len: positions per sequence (prompt + answer)."""
    examples = tokenize_pairs(pairs, tokenizer, template, max_seq_len, skip_overlength)
    return PairLoader(examples, tokenizer.pad_id, max_seq_len, batch_size, rank, world_size, seed, buffer_size)
