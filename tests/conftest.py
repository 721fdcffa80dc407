"""Test setup: 8 simulated CPU devices, float32, before jax is imported anywhere."""

import os
import pathlib
import sys
import tempfile

# The experiments' helper modules (experiments/ep_traffic.py, accuracy_intervals.py) are tested here too.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (a train step, the model): share compilations across tests, across
# the subprocesses they start (train mains, notebooks: hence environment variables, which those inherit)
# and across runs on one machine, through JAX's persistent cache outside the clone.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "deepseek_jax_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# glibc's huge pages for malloc, as the `python -m deepseek_jax...` mains run (deepseek_jax/host_memory.py).
# glibc reads them when a process starts, so they reach the processes started from here on: pytest-xdist's
# workers, which run the tests, and the tests' own subprocesses (timed by hand: 436 s in one run with it,
# 463-468 s in three without).
from deepseek_jax.host_memory import huge_pages_for_new_processes  # noqa: E402  (imports neither jax nor numpy)

huge_pages_for_new_processes(os.environ)

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")
