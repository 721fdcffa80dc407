"""Host memory: how glibc serves XLA:CPU's per-step temporaries.

XLA:CPU allocates each execution's temporaries as one block (`posix_memalign`, 388 MB for configs/tiny.py's
forward + backward) from an executor thread. glibc serves a request that large from a thread's arena with
a fresh `mmap` and `munmap`s it when freed, so every step the kernel maps and zero-fills all of it again in
4 KiB pages: about 100,000 page faults per training step of the tiny model. Two remedies:

**Huge pages (on by default for the command-line mains).** glibc's tunable `glibc.malloc.hugetlb=1` makes
malloc ask for transparent huge pages (`madvise(MADV_HUGEPAGE)`) on what it maps: the block is then mapped
in 2 MiB pages, 512 times fewer faults and TLB entries. On this 2-core CPU (experiments/bench_host_memory.py,
fresh processes alternating, 3 rounds) tiny's train step runs 1.25x faster (faults per step 98,700 -> 1,500),
1.25x with MTP, and small's 1.07x. glibc reads its tunables once, when the process starts, so
`restart_with_huge_pages` (called by `import deepseek_jax` in a `python -m deepseek_jax...` main, before
anything else is imported) restarts the process once, same arguments, with GLIBC_TUNABLES extended. It does
so only where it changes something: Linux with glibc >= 2.35 and transparent huge pages in 'madvise' mode
(with 'always' the kernel already uses them; with 'never' it cannot). Elsewhere (notebooks, your own
scripts) start Python with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment to get the same; the
test suite's conftest sets it for the processes pytest starts. DEEPSEEK_JAX_HUGE_PAGES=0 turns both off.

**Keeping freed memory (opt-in).** `keep_freed_memory` makes every thread allocate from the main heap,
never `mmap`, and keeps up to 2 GiB of freed memory there (glibc's `mallopt`); the next step reuses the
block (faults per tiny step: 98,700 -> 0.5-17 thousand). Off by default, because it buys less than huge
pages and costs memory: tiny's train step 1.07x faster, 1.13x with MTP, small's 0.95x (the same benchmark);
`make train` as fast (system time 85 s -> 14 s, user time 374 s -> 427 s) with 0.7 GiB more peak RSS
(docs/DESIGN.md, "CPU speed"). DEEPSEEK_JAX_KEEP_FREED_MEMORY=1 in the environment turns it on; it must act
before XLA's threads first allocate (an arena, once a thread has its own, stays its own), so
`import deepseek_jax` applies it. Where the C library has no `mallopt` (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

ENV = "DEEPSEEK_JAX_KEEP_FREED_MEMORY"
HUGE_PAGES_ENV = "DEEPSEEK_JAX_HUGE_PAGES"
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: madvise(MADV_HUGEPAGE) on what malloc maps
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"  # e.g. "always [madvise] never"
# glibc's mallopt parameters (malloc.h) and the values set.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
SETTINGS = {_M_ARENA_MAX: 1, _M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}


def _switch(environ, name: str, default: str, on: str, off: str) -> bool:
    value = environ.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: use 1 ({on}) or 0 ({off}).")
    return value == "1"


def keep_freed_memory() -> bool:
    """Applies SETTINGS with glibc's mallopt if the environment asks (ENV=1). True if they were applied;
    False when not asked or where the C library has no mallopt."""
    if not _switch(os.environ, ENV, "0", "keep freed host memory for reuse", "glibc's defaults, the default"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, setting) == 1 for parameter, setting in SETTINGS.items())


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'); None where unknown."""
    try:
        with open(THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


def huge_pages_tunables(environ, libc: tuple[str, str] | None = None, mode: str | None = None) -> str | None:
    """The GLIBC_TUNABLES value under which glibc's malloc asks for huge pages (`environ`'s own tunables plus
    HUGE_PAGES_TUNABLE); None where that changes nothing: opted out (HUGE_PAGES_ENV=0), already set, not
    glibc >= 2.35, or huge pages not in 'madvise' mode. `libc` and `mode` default to this machine's."""
    if not _switch(environ, HUGE_PAGES_ENV, "1", "restart the mains with huge pages, the default",
                   "leave glibc's tunables alone"):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if HUGE_PAGES_TUNABLE.partition("=")[0] + "=" in current:  # set either way by whoever started us
        return None
    name, version = libc if libc is not None else platform.libc_ver()
    if name != "glibc" or tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (2, 35):
        return None
    if (mode if mode is not None else thp_mode()) != "madvise":
        return None
    return f"{current}:{HUGE_PAGES_TUNABLE}" if current else HUGE_PAGES_TUNABLE


def huge_pages_for_new_processes(environ) -> str:
    """Puts `huge_pages_tunables` into `environ` (os.environ: the processes started from then on inherit it)
    where that changes something. Returns environ's GLIBC_TUNABLES."""
    tunables = huge_pages_tunables(environ)
    if tunables is not None:
        environ["GLIBC_TUNABLES"] = tunables
    return environ.get("GLIBC_TUNABLES", "")


def is_deepseek_jax_main(argv: list[str]) -> bool:
    """Whether `argv` (the interpreter's own, `sys.orig_argv`) runs `python [options] -m deepseek_jax...`."""
    options = iter(argv[1:])
    for arg in options:
        if arg.startswith("-m"):
            module = arg[2:] or next(options, "")
            return module.split(".")[0] == "deepseek_jax"
        if arg in ("-X", "-W"):  # an interpreter option with a separate value
            next(options, None)
        elif arg.startswith("-c") or not arg.startswith("-"):  # code or a script comes first
            return False
    return False


def restart_with_huge_pages() -> None:
    """In a `python -m deepseek_jax...` main: replaces the process with itself (same interpreter, arguments
    and working directory) under `huge_pages_tunables`, when that changes something. Call it before jax
    starts a thread; it returns where there is nothing to do."""
    if not is_deepseek_jax_main(sys.orig_argv):
        return
    tunables = huge_pages_tunables(os.environ)
    if tunables is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})

