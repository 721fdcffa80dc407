"""deepseek_jax: DeepSeek-V3 in JAX/Flax."""

from deepseek_jax.host_memory import keep_freed_memory

keep_freed_memory()  # Only if DEEPSEEK_JAX_KEEP_FREED_MEMORY=1; before XLA's threads first allocate.
