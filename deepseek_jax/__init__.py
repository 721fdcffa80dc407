"""deepseek_jax: DeepSeek-V3 in JAX/Flax."""
