"""Host memory, opt-in: keep what XLA:CPU frees for its next execution instead of handing it back to the kernel.

XLA:CPU allocates each execution's temporaries as one block (`posix_memalign`, 388 MB for configs/tiny.py's
forward + backward) from an executor thread. glibc serves a request that large from a thread's arena with
a fresh `mmap` and `munmap`s it when freed, so every step the kernel maps and zero-fills all of it again:
about 100,000 page faults per training step of the tiny model. `keep_freed_memory` makes every thread
allocate from the main heap, never `mmap`, and keeps up to 2 GiB of freed memory there (glibc's `mallopt`);
the next step reuses the block (faults per tiny step: 95,000 -> 0.6-18 thousand).

Off by default, because on this 2-core CPU it buys little and costs memory: tiny's train step 1.05x faster
without MTP, 1.00x with it (experiments/bench_host_memory.py), `make train` as fast (system time 85 s ->
14 s, user time 374 s -> 427 s) with 0.7 GiB more peak RSS (docs/DESIGN.md, "CPU speed").
DEEPSEEK_JAX_KEEP_FREED_MEMORY=1 in the environment turns it on; it must act before XLA's threads first
allocate (an arena, once a thread has its own, stays its own), so `import deepseek_jax` applies it. Where
the C library has no `mallopt` (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "DEEPSEEK_JAX_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h) and the values set.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
SETTINGS = {_M_ARENA_MAX: 1, _M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}


def keep_freed_memory() -> bool:
    """Applies SETTINGS with glibc's mallopt if the environment asks (ENV=1). True if they were applied;
    False when not asked or where the C library has no mallopt."""
    value = os.environ.get(ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: use 1 (keep freed host memory for reuse) or 0 (glibc's "
                         "defaults, the default).")
    if value == "0":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, setting) == 1 for parameter, setting in SETTINGS.items())
