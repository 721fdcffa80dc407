"""The one weight loader: a training run (params or EMA), a converted and a Hugging Face checkpoint, onto a
mesh in the run's shardings, with errors that name the setting."""

import chex
import jax
import ml_collections
import numpy as np
import pytest
from common import micro_run_config

from deepseek_jax import convert, model
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import placement
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.weights import load_weights, weights_kind


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A training run's checkpoint at step 5 (EMA = 2 x params, so the two differ), a converted workdir and
    a Hugging Face directory of the same variables."""
    tmp = tmp_path_factory.mktemp("weights")
    config = micro_run_config(tmp, write_corpus=False)
    cfg = ModelConfig.from_dict(config.model)
    tx = make_optimizer(config.train)
    state = step_lib.init_state(cfg, tx, jax.random.key(3))
    ema = jax.tree.map(lambda p: 2 * p, state.params)
    ckpt = checkpoint_lib.Checkpointer(str(tmp / "run" / "checkpoints"), keep=1, async_save=False)
    ckpt.save(5, state, ema=ema, data_state={}, model_config=cfg)
    ckpt.close()
    variables = {"params": state.params, "routing": state.routing}
    convert.save_checkpoint(cfg, variables, str(tmp / "hf"))
    convert.hf_to_workdir(str(tmp / "hf"), str(tmp / "converted"))
    return tmp, config, cfg, jax.device_get(variables), jax.device_get(ema)


def test_training_run_params_and_ema_onto_a_mesh(saved):
    tmp, config, cfg, variables, ema = saved
    parallel = ml_collections.ConfigDict(dict(stage=1, data=2, expert=4, tensor=1, rules="heads="))
    mesh, rules = mesh_lib.make_mesh(parallel), mesh_lib.run_rules(parallel)
    loaded = load_weights(str(tmp / "run"), cfg, optimizer_cfg=config.train, mesh=mesh, rules=rules)
    assert loaded.step == 5 and loaded.source == f"{tmp / 'run'} step 5"
    chex.assert_trees_all_equal(jax.device_get(loaded.variables), variables)
    want = placement.variable_shardings(cfg, mesh, rules)
    jax.tree.map(lambda a, s: (a.sharding == s) or pytest.fail(f"{a.sharding} != {s}"), loaded.variables, want)
    with_ema = load_weights(str(tmp / "run"), cfg, optimizer_cfg=config.train, use_ema=True)
    assert with_ema.source.endswith("step 5 (EMA)")
    chex.assert_trees_all_equal(jax.device_get(with_ema.variables["params"]), ema)


def test_converted_and_hugging_face_checkpoints(saved):
    tmp, config, cfg, variables, _ = saved
    assert [weights_kind(str(tmp / d)) for d in ("run", "converted", "hf")] == ["train", "converted", "hf"]
    converted = load_weights(str(tmp / "converted"), cfg)
    assert converted.step is None and converted.source == f"{tmp / 'converted'} (converted)"
    chex.assert_trees_all_equal(jax.device_get(converted.variables), variables)
    hf = load_weights(str(tmp / "hf"), None)  # Its own config (generate --hf_path has no run config).
    chex.assert_trees_all_equal(jax.device_get(hf.variables), variables)
    assert hf.cfg.replace(dtype=cfg.dtype, moe_dispatch=cfg.moe_dispatch, remat=cfg.remat) == cfg
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(stage=1, data=2, expert=4, tensor=1)))
    on_mesh = load_weights(str(tmp / "hf"), cfg, mesh=mesh)
    experts = on_mesh.variables["params"]["moe_layers"]["mlp"]["experts"]["gate_proj"]
    assert experts.addressable_shards[0].data.shape[1] == cfg.n_routed_experts // 4


def test_errors_name_the_setting_and_the_fix(saved):
    tmp, config, cfg, _, _ = saved
    with pytest.raises(checkpoint_lib.CheckpointError, match=r"config.train.init_from='.*nowhere' is neither a "
                       r"training run .*does not exist"):
        load_weights(str(tmp / "nowhere"), cfg, field="config.train.init_from")
    with pytest.raises(checkpoint_lib.CheckpointError, match="holds no EMA"):
        ckpt = checkpoint_lib.Checkpointer(str(tmp / "no_ema" / "checkpoints"), keep=1, async_save=False)
        state = jax.eval_shape(lambda: step_lib.init_state(cfg, make_optimizer(config.train), jax.random.key(0)))
        ckpt.save(1, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), state), ema=None, data_state={},
                  model_config=cfg)
        ckpt.close()
        load_weights(str(tmp / "no_ema"), cfg, optimizer_cfg=config.train, use_ema=True)
    with pytest.raises(checkpoint_lib.CheckpointError, match="imported checkpoint: it has no training steps"):
        load_weights(str(tmp / "converted"), cfg, use_ema=True)
    with pytest.raises(ValueError, match="is a training run: reading it needs the run config"):
        load_weights(str(tmp / "run"), None)
    with pytest.raises(checkpoint_lib.CheckpointError, match="hidden_size: checkpoint 32 vs config 64"):
        load_weights(str(tmp / "converted"), cfg.replace(hidden_size=64))


def test_random_init_is_not_a_checkpoint(saved):
    """The loader reads what was saved, not a fresh init of the same shapes."""
    tmp, config, cfg, variables, _ = saved
    fresh = jax.device_get(model.init(cfg, jax.random.key(4)))
    loaded = jax.device_get(load_weights(str(tmp / "converted"), cfg).variables)
    assert not np.array_equal(fresh["params"]["lm_head"]["kernel"], loaded["params"]["lm_head"]["kernel"])
