"""deepseek_jax: DeepSeek-V3 in JAX/Flax."""

from deepseek_jax.host_memory import keep_freed_memory, restart_with_huge_pages

restart_with_huge_pages()  # Only in a `python -m deepseek_jax...` main where huge pages are off (host_memory.py).
keep_freed_memory()  # Only if DEEPSEEK_JAX_KEEP_FREED_MEMORY=1; before XLA's threads first allocate.
