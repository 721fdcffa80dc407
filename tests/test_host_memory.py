"""deepseek_jax.host_memory (opt-in): a block a worker thread frees stays in the process and is reused."""

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
