"""CPU benchmark of `prepare`: a synthetic webtext2019zh-format corpus (JSON lines, random common Chinese characters,
5% exact and 5% near duplicates planted) through read -> clean -> exact + MinHash-LSH dedup -> shuffle -> shards.

    python bench/prepare.py --rows 1000000 250000

Each size runs in a fresh child process; we report rows/s end to end, the child's peak RSS and (Linux) the peak of
each step: reading + hashing, dedup (every row's keys at once, ~115 bytes a row), writing (one shard at a time). Each
step's peak is fitted as a + b * rows over the sizes to extrapolate to the seed's 10M rows; below ~1M rows the fixed
memory of the write step hides the per-row part, so give sizes of 1M and more.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
def common_chars(n: int = 1500) -> np.ndarray:
    """The first n characters of GB2312 level 1 (frequent characters): varied enough that random rows are distinct."""
    out = []
    for hi in range(0xB0, 0xD8):
        for lo in range(0xA1, 0xFF):
            try:
                out.append(ord(bytes([hi, lo]).decode("gb2312")))
            except UnicodeDecodeError:
                pass
    return np.array(out[:n], dtype=np.uint32)


def make_corpus(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    chars = common_chars()
    punct = np.array([ord(c) for c in "，。？！、"], dtype=np.uint32)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < rows:
            n = min(50_000, rows - written)
            t_len, c_len = rng.integers(8, 30, n), rng.integers(40, 300, n)
            total = int(t_len.sum() + c_len.sum())
            cps = chars[rng.integers(0, len(chars), total)]
            mask = rng.random(total) < 0.06
            cps[mask] = punct[rng.integers(0, len(punct), int(mask.sum()))]
            text = cps.tobytes().decode("utf-32-le")
            pos, lines, prev = 0, [], None
            for i in range(n):
                title, pos = text[pos:pos + t_len[i]] + "？", pos + t_len[i]
                content, pos = text[pos:pos + c_len[i]] + "。", pos + c_len[i]
                r = rng.random()
                if prev and r < 0.05:           # exact duplicate of the previous row
                    title, content = prev
                elif prev and r < 0.10:         # near duplicate: one character changed
                    title, content = prev[0], prev[1][:-3] + "的" + prev[1][-2:]
                prev = (title, content)
                lines.append(json.dumps({"qid": written + i, "title": title, "desc": "", "topic": "bench",
                                         "star": int(rng.integers(0, 40)), "content": content}, ensure_ascii=False))
            f.write("\n".join(lines) + "\n")
            written += n


def _peak_mb(reset: bool = False) -> int | None:
    """This process's peak RSS so far (Linux: VmHWM), optionally reset to the current RSS afterwards."""
    try:
        peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return round(peak / 1024)
    except OSError:
        return None


def run_child(corpus: Path, out: Path, worker: str) -> dict:
    """Run one prepare in this (fresh) process and print its figures as JSON; on Linux also the peak RSS of each
    step: reading + hashing (pass 1), dedup (the keys of every row at once), writing the shards (pass 2)."""
    sys.path.insert(0, str(REPO))
    import utils.prepare as prep
    phases: dict[str, int | None] = {}
    arrays, write_shards = prep._Spool.arrays, prep._write_shards

    def timed_arrays(self):
        phases["read"] = _peak_mb(reset=True)
        return arrays(self)

    def timed_write(*args, **kwargs):
        phases["dedup"] = _peak_mb(reset=True)
        result = write_shards(*args, **kwargs)
        phases["write"] = _peak_mb()
        return result

    prep._Spool.arrays, prep._write_shards = timed_arrays, timed_write
    t0 = time.perf_counter()
    stats = prep.prepare_corpora([("webtext", corpus)], out, prep.PrepareConfig(overwrite=True, worker=worker))
    seconds = time.perf_counter() - t0
    c = stats["corpora"]["webtext"]
    return {"rows_read": stats["total"]["read"], "rows_kept": stats["total"]["kept"], "seconds": round(seconds, 2),
            "rows_per_s": round(stats["total"]["read"] / seconds), "dropped": c["dropped"],
            "rows_deduplicated": c["rows"] - sum(v for k, v in c["dropped"].items() if k in prep.ROW_REASONS)
            + c["dropped"].get("duplicate", 0) + c["dropped"].get("near_duplicate", 0),
            "dedup_seconds": stats["total"]["dedup_seconds"], "write_seconds": stats["total"]["write_seconds"],
            "peak_rss_mb": max([round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                                *(v for v in phases.values() if v)]),
            "peak_rss_mb_by_step": phases,
            # a "process" worker has exited by now; main + worker peaks is an upper bound of the combined peak
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 250_000], help="corpus sizes to run")
    ap.add_argument("--workdir", type=Path, default=None, help="where the synthetic corpora go (default: a temp dir)")
    ap.add_argument("--worker", choices=("thread", "process", "inline"), default="thread",
                    help="where chunks are hashed (PrepareConfig.worker)")
    ap.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(*args.child, args.worker)))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="prepare_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:
        corpus = work / f"webtext_{rows}.json"
        if not corpus.exists():
            t = time.perf_counter()
            make_corpus(corpus, rows)
            print(f"generated {rows:,} rows ({corpus.stat().st_size / 2**20:.0f} MiB) "
                  f"in {time.perf_counter() - t:.0f}s")
        proc = subprocess.run([sys.executable, __file__, "--child", str(corpus), str(work / f"out_{rows}"),
                               "--worker", args.worker],
                              capture_output=True, text=True, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update(rows=rows, input_mib=round(corpus.stat().st_size / 2**20), worker=args.worker)
        results.append(res)
        print(json.dumps(res))
    if len(results) >= 2:
        # the peak of each step, fitted over the sizes: reading/hashing and dedup grow with the rows (dedup holds
        # ~115 bytes of keys per row at once), writing works one shard at a time; the largest at 10M rows is the
        # estimate (a worker process's own peak added)
        x = np.array([r["rows"] for r in results], dtype=float)
        steps = [k for k in ("read", "dedup", "write") if all(r["peak_rss_mb_by_step"].get(k) for r in results)]
        series = {k: [r["peak_rss_mb_by_step"][k] + r["worker_peak_rss_mb"] for r in results] for k in steps} or {
            "whole run": [r["peak_rss_mb"] + r["worker_peak_rss_mb"] for r in results]}
        at_10m = {}
        for step, y in series.items():
            b, a = np.polyfit(x, np.array(y, dtype=float), 1)
            at_10m[step] = a + max(b, 0) * 1e7
            print(f"peak RSS, {step}: {a:.0f} MB + {b * 1e6:.0f} MB per 1M rows read ({b * 2**20:.0f} bytes a row)")
        step = max(at_10m, key=at_10m.get)
        print(f"-> about {at_10m[step]:.0f} MB at 10M rows ({step})")
    print(f"cores usable: {len(os.sched_getaffinity(0))}")


if __name__ == "__main__":
    main()
