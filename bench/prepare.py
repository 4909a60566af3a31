"""CPU benchmark of `prepare`: a synthetic webtext2019zh-format corpus (JSON lines, random common Chinese characters,
5% exact and 5% near duplicates planted) through read -> clean -> exact + MinHash-LSH dedup -> shuffle -> shards.

    python bench/prepare.py --rows 1000000 250000

Each size runs in a fresh child process; we report rows/s end to end and the child's peak RSS, then fit
RSS = a + b * rows over the sizes to extrapolate to the seed's 10M rows.
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


def run_child(corpus: Path, out: Path, worker: str) -> dict:
    """Run one prepare in this (fresh) process and print its figures as JSON."""
    sys.path.insert(0, str(REPO))
    from utils.prepare import PrepareConfig, prepare_corpora
    t0 = time.perf_counter()
    stats = prepare_corpora([("webtext", corpus)], out, PrepareConfig(overwrite=True, worker=worker))
    seconds = time.perf_counter() - t0
    return {"rows_read": stats["total"]["read"], "rows_kept": stats["total"]["kept"], "seconds": round(seconds, 2),
            "rows_per_s": round(stats["total"]["read"] / seconds), "dropped": stats["corpora"]["webtext"]["dropped"],
            "dedup_seconds": stats["total"]["dedup_seconds"], "write_seconds": stats["total"]["write_seconds"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
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
        x = np.array([r["rows"] for r in results], dtype=float)
        y = np.array([r["peak_rss_mb"] + r["worker_peak_rss_mb"] for r in results], dtype=float)
        b, a = np.polyfit(x, y, 1)
        print(f"peak RSS ~ {a:.0f} MB + {b * 1e6:.0f} MB per 1M rows -> {a + b * 1e7:.0f} MB at 10M rows")
    print(f"cores usable: {len(os.sched_getaffinity(0))}")


if __name__ == "__main__":
    main()
