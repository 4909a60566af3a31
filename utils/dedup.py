"""Exact and MinHash-LSH near-duplicate removal, vectorized so that 10M rows fit in a few GB and run at CPU speed.

Per row we keep only a 64-bit exact hash and one 64-bit key per LSH band, never the text or the full signature.
The MinHash is datasketch's default scheme ("affine32": MurmurHash3 fmix32 of the shingle hash, then
`a * h + b mod 2**32` with datasketch's `a, b` for the same seed), computed for a whole chunk of rows at once with
numpy; the band count and width are the ones `datasketch.MinHashLSH` picks for the same threshold and num_perm. So a
signature equals `datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash).hashvalues`, and a row is a
near-duplicate exactly when datasketch's LSH, fed the rows in order (query, then insert), returns a candidate.
The first occurrence is kept. Shingles are character n-grams (default 3), not
single characters, whose set-Jaccard calls most long Chinese texts duplicates of each other.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

FNV_PRIME = np.uint32(16777619)
FNV_OFFSET = np.uint32(2166136261)
_FMIX = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
_NOT_KEPT = re.compile(r"[^\u3400-\u4dbf\u4e00-\u9fff0-9a-z]+")
_GOLDEN, _M64A, _M64B = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.85   # Jaccard threshold of the LSH
    num_perm: int = 256       # permutations
    ngram: int = 3            # character shingle length (1 matches most long texts)
    seed: int = 1             # datasketch's default MinHash seed
    # an instruction (belle / alpaca instruction with an input, instruct's instruct with a query) that this many rows
    # of a spool chunk share, or that an earlier chunk shared, is left out of what dedup compares: the rest of the
    # record (input + response) is compared among rows of that same instruction. 0: compare whole prompts
    instruction_repeats: int = 2

    def __post_init__(self) -> None:
        if self.instruction_repeats < 0:
            raise ValueError(f"instruction_repeats must be 0 (off) or a row count, got {self.instruction_repeats}")


def _codepoints(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Lower-cased code points of a chunk of documents joined by NUL, and each code point's document index."""
    text = "\x00".join(docs).lower()
    if text.count("\x00") != len(docs) - 1:  # NUL separates documents, so none may hide inside one
        text = "\x00".join(d.replace("\x00", "") for d in docs).lower()
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return cp, np.cumsum(cp == 0, dtype=np.int32)


def _offsets(doc_id: np.ndarray, n: int) -> np.ndarray:
    return np.searchsorted(doc_id, np.arange(n + 1))


def _exact_mask(cp: np.ndarray) -> np.ndarray:
    """What exact dedup compares: everything but whitespace, control characters and punctuation (ASCII, general,
    CJK and full-width); the prompt/response separator 0x1F is kept so the boundary still counts."""
    punct = (((cp >= 0x21) & (cp <= 0x2F)) | ((cp >= 0x3A) & (cp <= 0x40)) | ((cp >= 0x5B) & (cp <= 0x60))
             | ((cp >= 0x7B) & (cp <= 0x7E)) | ((cp >= 0x2000) & (cp <= 0x206F)) | ((cp >= 0x3000) & (cp <= 0x303F))
             | ((cp >= 0xFF01) & (cp <= 0xFF0F)) | ((cp >= 0xFF1A) & (cp <= 0xFF20)) | ((cp >= 0xFF3B) & (cp <= 0xFF40))
             | ((cp >= 0xFF5B) & (cp <= 0xFF65)) | (cp == 0xA0) | (cp == 0x2026))
    return ((cp > 0x20) | (cp == 0x1F)) & (cp != 0x7F) & ~punct


def _lookup(mask_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A mask function as a table over the BMP plus one entry for every code point above it (all alike there)."""
    return mask_of(np.arange(0x10001, dtype=np.uint32))


def _masked(table: np.ndarray, cp: np.ndarray) -> np.ndarray:
    return table[np.minimum(cp, 0x10000)]  # one gather instead of a dozen range tests over every code point


def _exact_from_codepoints(cp: np.ndarray, doc_id: np.ndarray, n: int) -> np.ndarray:
    keep = _masked(_EXACT_TABLE, cp)
    buf, off = memoryview(cp[keep].tobytes()), _offsets(doc_id[keep], n) * 4
    digests = b"".join(hashlib.blake2b(buf[off[i]:off[i + 1]], digest_size=8).digest() for i in range(n))
    return np.frombuffer(digests, dtype=np.uint64).copy()


def exact_hashes(prompts: list[str], responses: list[str]) -> np.ndarray:
    """One 64-bit key per row; rows that differ only in case, whitespace or punctuation share it."""
    docs = [p + "\x1f" + r for p, r in zip(prompts, responses)]
    cp, doc_id = _codepoints(docs)
    return _exact_from_codepoints(cp, doc_id, len(docs))


def shingle_hash(gram: str) -> int:
    """32-bit FNV-1 over code points: the scalar twin of the vectorized hash (pass it to datasketch as hashfunc)."""
    h = int(FNV_OFFSET)
    for ch in gram:
        h = ((h * int(FNV_PRIME)) & 0xFFFFFFFF) ^ ord(ch)
    return h


def _keep_mask(cp: np.ndarray) -> np.ndarray:
    """The characters MinHash looks at: CJK ideographs, ASCII letters and digits."""
    return (((cp >= 0x4E00) & (cp <= 0x9FFF)) | ((cp >= 0x3400) & (cp <= 0x4DBF))
            | ((cp >= 0x30) & (cp <= 0x39)) | ((cp >= 0x61) & (cp <= 0x7A)))


_EXACT_TABLE, _KEEP_TABLE = _lookup(_exact_mask), _lookup(_keep_mask)


def shingles(text: str, ngram: int) -> set[str]:
    """The shingle set of one document, as the vectorized code sees it (for tests and datasketch comparison)."""
    kept = _NOT_KEPT.sub("", text.lower())
    if not kept:
        return set()
    if len(kept) <= ngram:
        return {kept}
    return {kept[i:i + ngram] for i in range(len(kept) - ngram + 1)}


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 parameters: same RandomState calls, same order."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


@lru_cache(maxsize=8)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) as datasketch.MinHashLSH picks them: the split of num_perm that minimizes the mean of
    the false-positive area (the integral of 1 - (1 - s^r)^b over [0, threshold]) and the false-negative area (of
    (1 - s^r)^b over [threshold, 1]). Gauss-Legendre with 256 nodes integrates these polynomials exactly (their
    degree b r <= num_perm)."""
    nodes, weights = np.polynomial.legendre.leggauss(256)
    below, above = threshold / 2 * (nodes + 1), threshold + (1 - threshold) / 2 * (nodes + 1)
    best, params = np.inf, (0, 0)
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1)[:, None]
        false_pos = threshold / 2 * (weights * (1 - (1 - below ** r) ** b)).sum(1)
        false_neg = (1 - threshold) / 2 * (weights * (1 - above ** r) ** b).sum(1)
        error = (false_pos + false_neg) / 2
        i = int(error.argmin())
        if error[i] < best:
            best, params = error[i], (b, i + 1)
    return params


def _fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = _FMIX
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s3)


def _shingle_hashes(cp: np.ndarray, doc_id: np.ndarray, n: int, ngram: int, skip: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """All shingle hashes of a chunk of documents, concatenated, and each document's start offset into them.
    Documents with no kept character, and those `skip` marks, get no shingles (offset[i] == offset[i+1])."""
    keep = _masked(_KEEP_TABLE, cp)
    if skip is not None:
        keep &= ~skip[doc_id]
    cp, doc_id = cp[keep], doc_id[keep]
    lengths = np.bincount(doc_id, minlength=n)[:n] if len(doc_id) else np.zeros(n, np.int64)
    # n-gram hashes at every position whose n-gram stays inside one document
    m = len(cp)
    if m >= ngram:
        h = np.full(m - ngram + 1, FNV_OFFSET, dtype=np.uint32)
        for k in range(ngram):
            h = (h * FNV_PRIME) ^ cp[k:m - ngram + 1 + k]
        valid = doc_id[:m - ngram + 1] == doc_id[ngram - 1:]
        h, hid = h[valid], doc_id[:m - ngram + 1][valid]
    else:
        h, hid = np.empty(0, np.uint32), np.empty(0, np.int64)
    # documents shorter than n: one shingle, the whole (kept) document
    short = np.flatnonzero((lengths > 0) & (lengths < ngram))
    if len(short):
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        extra = np.array([shingle_hash("".join(map(chr, cp[starts[i]:starts[i] + lengths[i]]))) for i in short],
                         dtype=np.uint32)
        h, hid = np.concatenate([h, extra]), np.concatenate([hid, short])
        order = np.argsort(hid, kind="stable")
        h, hid = h[order], hid[order]
    return h, _offsets(hid, n)


def minhash_signatures(docs: list[str], num_perm: int = 256, seed: int = 1, ngram: int = 3
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(signatures [n, num_perm] uint32, has_shingles [n] bool). Rows without shingles get all-max signatures,
    like an empty datasketch MinHash."""
    cp, doc_id = _codepoints(docs)
    return _signatures(cp, doc_id, len(docs), num_perm, seed, ngram)


def _signatures(cp: np.ndarray, doc_id: np.ndarray, n: int, num_perm: int, seed: int, ngram: int,
                block: int = 4096, skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    a, b = _permutations(num_perm, seed)
    hv, offsets = _shingle_hashes(cp, doc_id, n, ngram, skip)
    hv = _fmix32(hv)
    sig = np.full((num_perm, n), np.iinfo(np.uint32).max, dtype=np.uint32)
    has = offsets[1:] > offsets[:-1]
    nonempty = np.flatnonzero(has)
    if not len(nonempty):
        return sig.T, has
    starts, ends = offsets[nonempty], offsets[nonempty + 1]
    # permutation-major blocks of ~`block` shingles keep the [num_perm, block] temporaries in cache; one buffer and
    # b laid out in full serve every block (adding a broadcast column is twice as slow as adding a contiguous array)
    cap = max(block, int((ends - starts).max()))
    buf, b_full, a_col = np.empty((num_perm, cap), np.uint32), np.repeat(b[:, None], cap, axis=1), a[:, None]
    every = len(nonempty) == n  # then the documents of a block are a slice of sig
    i = 0
    while i < len(nonempty):
        j = max(int(np.searchsorted(ends, starts[i] + block, side="right")), i + 1)
        s0, s1 = starts[i], ends[j - 1]
        perm = buf[:, :s1 - s0]
        np.multiply(a_col, hv[None, s0:s1], out=perm)
        np.add(perm, b_full[:, :s1 - s0], out=perm)
        if every:
            np.minimum.reduceat(perm, starts[i:j] - s0, axis=1, out=sig[:, i:j])
        else:
            sig[:, nonempty[i:j]] = np.minimum.reduceat(perm, starts[i:j] - s0, axis=1)
        i = j
    return sig.T, has


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (row, band): a multiply-xor fold of the band's `rows` values, then the MurmurHash3
    64-bit finalizer. [n, bands] uint64."""
    sig = sig.astype(np.uint64)
    out = np.empty((sig.shape[0], bands), dtype=np.uint64)
    for k in range(bands):
        h = np.full(sig.shape[0], ((k + 1) * int(_GOLDEN)) % (1 << 64), dtype=np.uint64)
        for j in range(k * rows, (k + 1) * rows):
            h = (h ^ sig[:, j]) * _M64A
        h ^= h >> np.uint64(33)
        h *= _M64B
        out[:, k] = h ^ (h >> np.uint64(33))
    return out


def chunk_keys(prompts: list[str], responses: list[str], cfg: DedupConfig, salt: np.ndarray | None = None
               ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """All that dedup must remember of a chunk of rows: exact keys [n], LSH band keys [n, bands] and whether each
    row has any shingle [n] (None for a disabled kind). MinHash sees prompt + response. With exact dedup on, a row
    that repeats an earlier row of the chunk exactly gets no shingles (it is dropped as a duplicate either way).

    `salt` [n] uint64 (0: none) is XORed into a row's keys: rows match only rows of the same salt. prepare passes the
    hash of a shared instruction that it left out of `prompts` (instruction_salt), so the rest of two records is
    compared only under the same instruction."""
    n = len(prompts)
    cp, doc_id = _codepoints([p + "\x1f" + r for p, r in zip(prompts, responses)])
    exact = _exact_from_codepoints(cp, doc_id, n) if cfg.exact else None
    if exact is not None and salt is not None:
        exact ^= salt
    if not cfg.near:
        return exact, None, None
    # an exact duplicate of an earlier row of the chunk is dropped as such and never compared: no signature for it
    repeat = ~first_occurrence(exact) if exact is not None else None
    sig, has = _signatures(cp, doc_id, n, cfg.num_perm, cfg.seed, cfg.ngram,
                           skip=repeat if repeat is not None and repeat.any() else None)
    bands = band_keys(sig, *lsh_params(cfg.threshold, cfg.num_perm))
    if salt is not None:
        bands ^= salt[:, None]
    return exact, bands, has


def instruction_salt(instruction: str) -> int:
    """A nonzero 64-bit key of an instruction (blake2b: the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(instruction.encode("utf-8"), digest_size=8).digest(), "little") or 1


def near_keys(docs: list[str], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(band keys [n, bands], has_shingles [n]) of whole documents."""
    sig, has = minhash_signatures(docs, cfg.num_perm, cfg.seed, cfg.ngram)
    return band_keys(sig, *lsh_params(cfg.threshold, cfg.num_perm)), has


def first_occurrence(keys: np.ndarray) -> np.ndarray:
    """Boolean mask: True where keys[i] did not occur at any j < i."""
    mask = np.zeros(len(keys), dtype=bool)
    if len(keys):
        _, first = np.unique(keys, return_index=True)
        mask[first] = True
    return mask


def near_duplicates(bands: np.ndarray | list[np.ndarray], eligible: np.ndarray) -> np.ndarray:
    """True for each eligible row that shares a band key with an earlier eligible row (the LSH query-then-insert
    rule); rows that are not eligible (exact duplicates, empty documents) neither match nor get matched. `bands` is
    [n, bands] or its row chunks in order (prepare's: one band's column is gathered at a time, never a copy of all)."""
    chunks = [bands] if isinstance(bands, np.ndarray) else bands
    idx = np.flatnonzero(eligible)
    dup = np.zeros(len(eligible), dtype=bool)
    for k in range(chunks[0].shape[1] if chunks else 0):
        column = np.concatenate([c[:, k] for c in chunks]) if len(chunks) > 1 else chunks[0][:, k]
        dup[idx[~first_occurrence(column[idx])]] = True
    return dup
