"""CPU threads for torch: as many as there are cores free to this process.

torch starts one OpenMP thread per core and every op waits for all of them at its end. When other work holds a core,
each op waits for a descheduled thread to get its turn, and small models run several times slower than on fewer
threads (docs/performance.md, "Threads on busy cores"). A run takes the cores it may use (its CPU affinity) less
those the 1-minute load average says are busy, at least one; OMP_NUM_THREADS, when set, decides instead (torchrun
sets it to 1 per process).
"""
from __future__ import annotations

import os
import sys


def free_cores() -> int:
    """Cores this process may run on, less the busy ones (the 1-minute load average, rounded); at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average (Windows)
        busy = 0
    return max(1, cores - busy)


def use_free_cores() -> int | None:
    """Unless OMP_NUM_THREADS is set (the user's or a launcher's choice), sets it and torch's intra-op threads to
    free_cores(): the environment variable serves a torch not yet imported and child processes. Returns the count
    set, or None when OMP_NUM_THREADS was already set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    n = free_cores()
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:  # torch read the variable when it was imported: tell it directly
        sys.modules["torch"].set_num_threads(n)
    return n
