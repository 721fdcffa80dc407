"""deepseek_jax.host_memory: huge pages for the mains (the tunable, when it applies, what it does to a thread's
block, the restart) and the opt-in reuse of a block a worker thread frees."""

import os
import subprocess
import sys

import pytest

from deepseek_jax import host_memory

# In a fresh interpreter: a worker thread (as XLA's executor threads) allocates and writes 256 MiB, frees
# it and does it again. Prints the bytes resident while the block lived, after it was freed, the page faults
# of the second allocation and the pages the block spans.
_PROBE = """
import os, resource, threading
import numpy as np
import deepseek_jax  # applies the settings, or not (the environment)

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

result = {}
def work():
    block = np.ones(2**25)  # 256 MiB of float64, written
    result["alive"] = resident()
    del block
    result["freed"] = resident()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    np.ones(2**25)
    result["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(result["alive"], result["freed"], result["faults"], 2**28 // resource.getpagesize())
"""


def _probe(setting: str | None) -> tuple[int, int, int, int]:
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV}
    if setting is not None:
        env[host_memory.ENV] = setting
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    alive, freed, faults, pages = map(int, done.stdout.split())
    return alive, freed, faults, pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_block_stays_and_is_reused():
    alive, freed, faults, pages = _probe("1")
    assert alive - freed < 2**24, (alive, freed)  # Freed, still resident (less than 16 of 256 MiB returned).
    assert faults < 0.05 * pages, (faults, pages)  # The second block is the first one, its pages in place.
    # With glibc's defaults (unset or 0) the thread's block is unmapped when freed (what the setting prevents).
    for setting in (None, "0"):
        alive, freed, _, _ = _probe(setting)
        assert alive - freed > 0.9 * 2**28, (setting, alive, freed)


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "yes")
    with pytest.raises(ValueError, match=f"{host_memory.ENV}='yes'.*use 1 .* or 0"):
        host_memory.keep_freed_memory()


# -- huge pages: glibc.malloc.hugetlb=1, the tunable the `python -m deepseek_jax...` mains restart with --

GLIBC = ("glibc", "2.36")


def test_huge_pages_tunables_only_where_they_change_something():
    hp = host_memory.HUGE_PAGES_TUNABLE
    assert host_memory.huge_pages_tunables({}, GLIBC, "madvise") == hp
    # Appended to tunables already set, which are kept.
    assert host_memory.huge_pages_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise") == (
        f"glibc.malloc.arena_max=2:{hp}")
    assert host_memory.huge_pages_tunables({"GLIBC_TUNABLES": hp}, GLIBC, "madvise") is None  # already on
    assert host_memory.huge_pages_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise") is None
    assert host_memory.huge_pages_tunables({host_memory.HUGE_PAGES_ENV: "0"}, GLIBC, "madvise") is None  # opted out
    assert host_memory.huge_pages_tunables({}, ("glibc", "2.34"), "madvise") is None  # no such tunable yet
    assert host_memory.huge_pages_tunables({}, ("", ""), "madvise") is None  # musl, macOS
    for mode in ("always", "never"):  # the kernel uses them anyway / cannot
        assert host_memory.huge_pages_tunables({}, GLIBC, mode) is None


def test_bad_huge_pages_setting_names_the_variable():
    with pytest.raises(ValueError, match=f"{host_memory.HUGE_PAGES_ENV}='on'.*use 1 .* or 0"):
        host_memory.huge_pages_tunables({host_memory.HUGE_PAGES_ENV: "on"}, GLIBC, "madvise")


def test_new_processes_get_huge_pages_only_where_they_change_something(monkeypatch):
    opted_out = {host_memory.HUGE_PAGES_ENV: "0", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert host_memory.huge_pages_for_new_processes(opted_out) == "glibc.malloc.arena_max=2"
    assert opted_out == {host_memory.HUGE_PAGES_ENV: "0", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    monkeypatch.setattr(host_memory, "huge_pages_tunables", lambda environ: "glibc.malloc.hugetlb=1")
    environ = {}
    assert host_memory.huge_pages_for_new_processes(environ) == "glibc.malloc.hugetlb=1"
    assert environ == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_only_deepseek_jax_mains_restart(monkeypatch):
    assert host_memory.is_deepseek_jax_main(["python", "-m", "deepseek_jax.train", "--config=c.py"])
    assert host_memory.is_deepseek_jax_main(["python", "-u", "-m", "deepseek_jax"])
    assert host_memory.is_deepseek_jax_main(["python", "-X", "dev", "-mdeepseek_jax.train"])
    assert not host_memory.is_deepseek_jax_main(["python", "-m", "pytest", "-m", "deepseek_jax"])
    assert not host_memory.is_deepseek_jax_main(["python", "-m", "deepseek_jaxx.train"])
    assert not host_memory.is_deepseek_jax_main(["python", "train.py", "-m", "deepseek_jax.train"])
    assert not host_memory.is_deepseek_jax_main(["python", "-c", "import deepseek_jax"])
    calls = []
    monkeypatch.setattr(host_memory.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(host_memory, "huge_pages_tunables", lambda environ: "glibc.malloc.hugetlb=1")
    monkeypatch.setattr(host_memory.sys, "orig_argv", ["python", "-m", "pytest"])
    host_memory.restart_with_huge_pages()
    assert calls == []
    argv = ["python", "-m", "deepseek_jax.train", "--workdir=w"]
    monkeypatch.setattr(host_memory.sys, "orig_argv", argv)
    host_memory.restart_with_huge_pages()
    (executable, restarted_argv, env), = calls
    assert (executable, restarted_argv, env["GLIBC_TUNABLES"]) == (sys.executable, argv, "glibc.malloc.hugetlb=1")


# In a fresh interpreter: a worker thread mallocs and writes 64 MiB (as XLA's executor threads do, through
# glibc), and reports how much of it the kernel backs with huge pages (/proc/self/smaps_rollup).
_HUGE_PROBE = """
import ctypes, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
def huge():
    return int(next(l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")).split()[1]) * 1024
result = {}
def work():
    before = huge()
    block = libc.malloc(2**26)
    ctypes.memset(block, 1, 2**26)
    result["huge"] = huge() - before
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(result["huge"])
"""


@pytest.mark.skipif(host_memory.huge_pages_tunables({}) is None,
                    reason="needs glibc >= 2.35 and transparent huge pages in 'madvise' mode")
def test_tunable_backs_a_threads_block_with_huge_pages():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def huge_bytes(tunables: str | None) -> int:
        probe_env = env if tunables is None else {**env, "GLIBC_TUNABLES": tunables}
        done = subprocess.run([sys.executable, "-c", _HUGE_PROBE], env=probe_env, capture_output=True, text=True,
                              check=True)
        return int(done.stdout)

    assert huge_bytes(None) == 0  # glibc's defaults: 4 KiB pages
    assert huge_bytes(host_memory.HUGE_PAGES_TUNABLE) >= 2**25  # most of the 64 MiB in 2 MiB pages
