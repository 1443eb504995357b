"""One thread count for every thread pool in a serving process, set before any pool starts.

Why this exists: TVM sizes its pool from TVM_NUM_THREADS, else OMP_NUM_THREADS, else half of
``std::thread::hardware_concurrency()`` on x86-64 (it assumes every core is two hyperthreads).
On a 2-vCPU VM without hyperthreads that is ONE thread, so a plain `llmc run` ran its kernels
on half the machine (issue 13: decode 29-33 tok/s against 47 with the thread count given).
Importing TVM also imports torch, whose OpenMP runtime would spin idle workers on the same
cores if anything ran an OpenMP region; the runtime never computes with torch, so its OpenMP
threads are told to sleep when idle. Tokenizers (rayon) and numpy's BLAS get the same count.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

POOL_VARIABLES = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                  "RAYON_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def configure_threads(threads: Optional[int] = None) -> int:
    """Give every pool ``threads`` workers (default: the usable cores) and return that number.

    An explicit ``threads`` overrides the environment; without it, a variable the user set
    stays as it is. Must run before TVM starts its pool (the first kernel call)."""
    count = int(threads) if threads else usable_cores()
    for name in POOL_VARIABLES:
        if threads or name not in os.environ:
            os.environ[name] = str(count)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:  # already imported (e.g. by TVM): its intra-op pool reads no env any more
        try:
            sys.modules["torch"].set_num_threads(count)
        except Exception:  # noqa: BLE001 - a torch without that call must not stop serving
            pass
    return count
