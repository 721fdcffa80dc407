"""Test setup: 8 simulated CPU devices, float32, before jax is imported anywhere."""

import os
import pathlib
import sys

# The experiments' helper modules (experiments/ep_traffic.py, accuracy_intervals.py) are tested here too.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")

import tempfile  # noqa: E402

# Many tests compile the same programs (a train step, the model): share compilations across tests
# (and across runs on one machine) through JAX's persistent cache.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "deepseek_jax_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
