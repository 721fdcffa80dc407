"""Pure-function entry points to the model: init, forward, logical axis specs.

Variables are the plain pytree `{'params': ..., 'routing': ...}` (routing holds the loss-free balancing
biases; it is empty for models without them). Parameters are unboxed: the logical axis names live in
the module definitions and are read back with `logical_axes`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.model.cache import KVCache
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.experts import Dispatch
from deepseek_jax.model.transformer import DeepSeekV3, ModelOutput
from deepseek_jax.ops.recipe import Recipe

Variables = dict


def _boxed_init(cfg: ModelConfig, key: jax.Array) -> Variables:
    variables = DeepSeekV3(cfg).init(key, jnp.zeros((1, 2), jnp.int32))
    return {"params": variables["params"], "routing": variables.get("routing", {})}


def init(cfg: ModelConfig, key: jax.Array) -> Variables:
    """Fresh variables (float32 params, zero routing biases), initialised under jit."""
    return jax.jit(lambda k: nn.meta.unbox(_boxed_init(cfg, k)))(key)


@functools.lru_cache(maxsize=16)
def _abstract_boxed(cfg: ModelConfig) -> Variables:
    """The boxed variables' shapes, traced once per config: a run asks for them several times (shardings,
    checkpoint targets, the optimizer's state) and each trace of the whole model costs a fraction of a
    second. Never handed out: the two functions below build new trees from it."""
    return jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0)))


def abstract_variables(cfg: ModelConfig) -> Variables:
    """Shapes and dtypes of the variables (jax.ShapeDtypeStruct leaves) without allocating anything."""
    return nn.meta.unbox(_abstract_boxed(cfg))


def logical_axes(cfg: ModelConfig) -> Variables:
    """The variables' logical axis names, as a pytree of PartitionSpec with logical names."""
    return nn.get_partition_spec(_abstract_boxed(cfg))


def apply(cfg: ModelConfig, variables: Variables, tokens_BT: jnp.ndarray,
          positions_BT: jnp.ndarray | None = None, segment_ids_BT: jnp.ndarray | None = None,
          recipe: Recipe | None = None, run_mtp: bool = True, *, dispatch: Dispatch | None = None,
          cache: KVCache | None = None, cached_attention: str = "absorbed") -> ModelOutput:
    """Full output: main logits, MTP logits, router statistics, final hidden state and the decode cache
    (see transformer.ModelOutput). `recipe`: the FP8 recipe; `dispatch`: the implementation of
    moe_dispatch='ep' (parallel/expert_parallel.py); `cache`: run the new tokens over a decode cache."""
    model = DeepSeekV3(cfg, recipe=recipe, dispatch=dispatch, cached_attention=cached_attention)
    return model.apply(variables, tokens_BT, positions_BT, segment_ids_BT, run_mtp, cache)


def forward(model_config: ModelConfig, params: Variables, tokens: jnp.ndarray) -> jnp.ndarray:
    """Next-token logits, float32 [B, T, V], of int32 tokens [B, T].

    `params` are the model's variables as returned by `init` (or a checkpoint import): the dict
    {'params': ..., 'routing': ...}. Position i's logits predict token i+1. The MTP modules are not run.
    """
    return apply(model_config, params, tokens, run_mtp=False).logits
