"""The DeepSeek-V3 model in Flax Linen: MLA, DeepSeekMoE, MTP (pure functional)."""

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.functional import abstract_variables, apply, forward, init, logical_axes
from deepseek_jax.model.transformer import DeepSeekV3, ModelOutput

__all__ = ["ModelConfig", "DeepSeekV3", "ModelOutput", "abstract_variables", "apply", "forward", "init",
           "logical_axes"]
