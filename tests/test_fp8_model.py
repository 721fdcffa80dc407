"""The FP8 recipe inside the model and the train step: where FP8 runs, and where it must not."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import micro_run_config

from deepseek_jax import model
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.ops.fp8 import Fp8Recipe, make_recipe
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.precision import recipe_for


def _is_fp8(var) -> bool:
    return "float8" in str(getattr(getattr(var, "aval", None), "dtype", ""))


def _walk(jaxpr, fp8_calls: list, leaks: list) -> None:
    """Collects the custom_vjp calls on matrices (the FP8 GEMMs), by name, and any float8 value outside
    them."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_vjp_call":
            if sum(1 for v in eqn.invars if getattr(v.aval, "ndim", 0) >= 2) >= 2:
                fp8_calls.append(eqn.params["call_jaxpr"].jaxpr.debug_info.func_name)
            continue
        if any(_is_fp8(v) for v in [*eqn.invars, *eqn.outvars]):
            leaks.append(str(eqn)[:160])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _walk(inner, fp8_calls, leaks)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    c = micro_run_config(tmp_path_factory.mktemp("fp8"))
    return c, ModelConfig.from_dict(c.model)


def test_fp8_only_in_eligible_linears(micro):
    _, cfg = micro
    variables = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda v, t: model.apply(cfg, v, t, recipe=Fp8Recipe(tile=8)))(variables, tokens)
    fp8_calls, leaks = [], []
    _walk(jaxpr.jaxpr, fp8_calls, leaks)
    # The scanned stacks appear once each: a dense block and a MoE block (5 MLA projections + 3 MLP
    # matmuls, the MoE block's being its shared expert), then the MTP module: eh_proj + its block.
    # Each MoE block's routed experts are two grouped calls: gate and up on one quantised x, then down.
    assert fp8_calls.count("_fp8_matmul_2d") == 8 + 8 + 1 + 8
    assert fp8_calls.count("_fp8_grouped_gemms") == 2 * 2 and len(fp8_calls) == 25 + 4
    # No float8 value anywhere else: embedding, norms, router, attention core, head stay high.
    assert not leaks, leaks[:3]


def test_fp8_train_step_lowers_to_fp8_gemms_forward_and_backward(micro):
    c, cfg = micro
    tx = make_optimizer(c.train)
    state = jax.eval_shape(lambda: step_lib.init_state(cfg, tx, jax.random.key(0)))
    batch = {k: jax.ShapeDtypeStruct((2, 16), jnp.int32) for k in ("tokens", "segment_ids", "positions")}
    recipe = Fp8Recipe(tile=8)
    text = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, train_cfg=c.train, tx=tx, recipe=recipe)
                   ).lower(state, batch).as_text()
    fp8_dots = [line for line in text.splitlines()
                if "dot_general" in line and "f8E4M3FN" in line and "-> tensor<" in line]
    assert fp8_dots and all(line.rstrip().endswith("xf32>") for line in fp8_dots)
    forward = jax.jit(lambda v, t: model.apply(cfg, v, t, recipe=recipe)[:2]).lower(
        {"params": state.params, "routing": state.routing}, batch["tokens"]).as_text()
    forward_dots = [line for line in forward.splitlines() if "dot_general" in line and "f8E4M3FN" in line]
    # Fprop, Dgrad and Wgrad: three FP8 GEMMs per Linear and per routed-expert GEMM (gate, up, down in
    # two MoE blocks) in training, one in inference (test_fp8_experts checks the expert GEMMs' shapes).
    assert len(forward_dots) == 25 + 6 and len(fp8_dots) == 3 * (25 + 6)


def test_fp8_training_step_tracks_float32(micro):
    c, cfg = micro
    tx = make_optimizer(c.train)
    state = step_lib.init_state(cfg, tx, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), tokens.shape)}
    losses = {}
    for name, recipe in (("f32", None), ("fp8", make_recipe("fine_grained", tile=8))):
        fn = jax.jit(functools.partial(step_lib.loss_and_metrics, cfg=cfg, train_cfg=c.train, recipe=recipe))
        losses[name] = float(fn(state.params, state.routing, batch, state.step)[0])
    assert losses["fp8"] == pytest.approx(losses["f32"], rel=1e-2)
    assert losses["fp8"] != losses["f32"]  # It really ran in FP8.


def test_config_selects_the_recipe(micro):
    c, _ = micro
    assert recipe_for(c) is None
    c.fp8.enabled = True
    assert isinstance(recipe_for(c), Fp8Recipe)
    c.fp8.recipe = "per_channel"
    with pytest.raises(ValueError, match="config.fp8.recipe='per_channel'"):
        recipe_for(c)
    np.testing.assert_equal(make_recipe("fine_grained").tile, 128)
