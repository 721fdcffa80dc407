"""Data, tensor and expert parallelism: a training step on a mesh equals the single-device step, the
optimizer state is sharded (ZeRO-1), and node-limited routing keeps each token on few device groups."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from common import micro_run_config, model_config
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_jax import model
from deepseek_jax.model import moe
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel.dispatch import training_model_config
from deepseek_jax.train import placement
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.optimizer import make_optimizer

MESHES = {  # (data, expert, tensor)
    "data8": (8, 1, 1),
    "data2_expert4": (2, 4, 1),
    "expert8": (1, 8, 1),
    "data2_tensor2_expert2": (2, 2, 2),
}


def run_config(tmp_path, data=1, expert=1, tensor=1):
    c = micro_run_config(tmp_path, warmup_steps=0, learning_rate=1e-3)
    c.model.update(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2)
    c.data.batch_size = 8
    c.parallel.update(data=data, expert=expert, tensor=tensor)
    return c


def batch_for(cfg: ModelConfig, rows=8, length=32, seed=0):
    """Two packed documents per row with padding at the end: segment ids and positions matter."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (rows, length)).astype(np.int32)
    cut = length // 2 + rng.integers(-4, 4, rows)
    col = np.arange(length)[None, :]
    segments = np.where(col < cut[:, None], 1, 2).astype(np.int32)
    segments[:, -3:] = 0
    positions = np.where(col < cut[:, None], col, col - cut[:, None]).astype(np.int32)
    return {"tokens": tokens, "segment_ids": segments, "positions": positions}


def step_outputs(config, cfg, state, batch, mesh=None):
    """(grads, metrics, router stats, new state) of one training step, on `mesh` or on one device."""
    tx = make_optimizer(config.train)
    grad_fn = jax.grad(step_lib.loss_and_metrics, has_aux=True)

    def step(state, batch):
        grads, (metrics, stats) = grad_fn(state.params, state.routing, batch, state.step, cfg, config.train)
        new_state, metrics = step_lib.apply_update(state, grads, dict(metrics), stats, config.train, tx)
        return grads, metrics, stats, new_state

    if mesh is None:
        return jax.device_get(jax.jit(step)(state, batch))
    shardings = placement.state_shardings(cfg, tx, mesh)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, shardings)
        out = jax.jit(step, out_shardings=(shardings.params, None, None, shardings))(
            state, mesh_lib.shard_batch(batch, mesh))
    return jax.device_get(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-device step with the dense (every expert on every token) dispatch."""
    config = run_config(tmp_path_factory.mktemp("ref"))
    cfg = ModelConfig.from_dict(config.model).replace(moe_dispatch="dense")
    tx = make_optimizer(config.train)
    state = step_lib.init_state(cfg, tx, jax.random.key(0))
    batch = batch_for(cfg)
    return jax.device_get(state), batch, step_outputs(config, cfg, state, batch)


@pytest.mark.parametrize("name", sorted(MESHES))
def test_step_on_mesh_equals_single_device(name, reference, tmp_path):
    state, batch, (want_grads, want_metrics, want_stats, want_state) = reference
    data, expert, tensor = MESHES[name]
    config = run_config(tmp_path, data, expert, tensor)
    cfg = training_model_config(config, ModelConfig.from_dict(config.model))
    assert cfg.moe_dispatch == "ep"
    mesh = mesh_lib.make_mesh(config.parallel)
    grads, metrics, stats, new_state = step_outputs(config, cfg, state, batch, mesh)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    assert sorted(metrics) == sorted(want_metrics)
    for key in want_metrics:
        close(metrics[key], want_metrics[key], err_msg=key)
    assert metrics["max_vio"] > 0 and metrics["balance_loss"] > 0
    chex.assert_trees_all_close(stats, want_stats, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(new_state, want_state, rtol=1e-5, atol=1e-5)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), new_state.params, state.params)
    assert min(jax.tree.leaves(moved)) > 1e-4  # The step really updated every parameter.


def test_optimizer_state_is_sharded_over_data(tmp_path):
    """ZeRO-1: Adam's moments are split over the params' data-parallel axes on top of their own
    sharding ('data' for the routed experts, 'data' x 'expert' for the rest), the params are not, and
    each device holds about 1/8 of the moments."""
    config = run_config(tmp_path, data=4, expert=2)
    cfg = training_model_config(config, ModelConfig.from_dict(config.model))
    tx = make_optimizer(config.train)
    mesh = mesh_lib.make_mesh(config.parallel)
    state = placement.init_sharded_state(cfg, tx, jax.random.key(0), mesh)
    experts = state.params["moe_layers"]["mlp"]["experts"]["up_proj"]
    assert experts.sharding.spec == PartitionSpec(None, "expert", None, None)
    mu = state.opt_state[1][0].mu
    assert mu["moe_layers"]["mlp"]["experts"]["up_proj"].sharding.spec == PartitionSpec(None, "expert", "data", None)
    # The vocabulary goes to 'tensor' (size 1 here), so ('data', 'expert') take the next dimension.
    assert mu["embed_tokens"]["embedding"].sharding.spec == PartitionSpec("tensor", ("data", "expert"))
    assert state.params["embed_tokens"]["embedding"].sharding.spec == PartitionSpec("tensor", None)
    moment_bytes = sum(a.nbytes for a in jax.tree.leaves(state.opt_state))
    per_device = placement.per_device_bytes(state.opt_state)
    assert len(per_device) == 8
    # Experts split 2 ways and 4 more, every other moment 8 ways: 1/8 of the total, but for the leaves
    # no dimension of which divides (biases of 8 experts, norms of odd sizes).
    assert max(per_device.values()) < 1.1 * moment_bytes / 8
    params_per_device = placement.per_device_bytes(state.params)
    assert max(per_device.values()) < 2 * max(params_per_device.values())  # Two moments, split 4 ways.
    # Same values as the un-sharded init.
    single = step_lib.init_state(cfg.replace(moe_dispatch="ragged"), tx, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(single))


def test_batch_and_mesh_errors_name_the_fields(tmp_path):
    from deepseek_jax.train.validation import validate_run_config

    bad = run_config(tmp_path, data=16)
    with pytest.raises(ValueError, match="parallel.stage/data/expert/tensor"):
        validate_run_config(bad)
    bad = run_config(tmp_path, data=2)
    bad.parallel.update(stage=8, pipeline="1f1b", microbatches=4)
    with pytest.raises(ValueError, match=r"parallel.stage/data/expert/tensor=\(8, 2, 1, 1\)"):
        validate_run_config(bad)
    bad.parallel.update(stage=2, tensor=2)
    with pytest.raises(ValueError, match="parallel.tensor.*not with tensor parallelism"):
        validate_run_config(bad)
    bad.parallel.update(tensor=1)
    bad.parallel.update(expert=1, microbatches=bad.data.batch_size)  # Micro-batches of 1 row over 2 shards.
    with pytest.raises(ValueError, match="parallel.microbatches.*split over parallel.data=2"):
        validate_run_config(bad)
    bad = run_config(tmp_path, data=2, expert=2)
    bad.data.batch_size = 6
    with pytest.raises(ValueError, match="data.batch_size"):
        validate_run_config(bad)
    bad = run_config(tmp_path, expert=3)
    with pytest.raises(ValueError, match="parallel.expert"):
        validate_run_config(bad)
    bad = run_config(tmp_path, data=2)
    bad.parallel.capacity_factor = 1.0
    with pytest.raises(ValueError, match="parallel.capacity_factor"):
        validate_run_config(bad)
    with pytest.raises(ValueError, match="parallel.stage=1, parallel.data=16"):
        mesh_lib.make_mesh(ml_collections.ConfigDict(dict(stage=1, data=16, expert=1, tensor=1)))


def test_node_limited_routing_matches_a_numpy_reference():
    """Each token's experts lie in at most M of the device groups, the groups being the M best by the sum
    of their K/M highest (biased) scores; then the top-K within them (V3 section 2.1.2)."""
    cfg = model_config().replace(
        n_routed_experts=16, n_group=1, topk_group=1, num_experts_per_tok=4, node_groups=4, node_limit=2)
    rng = np.random.default_rng(0)
    scores = rng.random((64, 16)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(16)).astype(np.float32)
    _, indices = jax.device_get(moe.select_experts(jnp.asarray(scores), jnp.asarray(bias), cfg))
    choice = scores + bias
    for n in range(64):
        group_scores = np.sort(choice[n].reshape(4, 4), axis=-1)[:, -2:].sum(-1)
        kept = np.argsort(-group_scores, kind="stable")[:2]
        allowed = np.concatenate([np.arange(4 * g, 4 * g + 4) for g in kept])
        want = allowed[np.argsort(-choice[n][allowed], kind="stable")[:4]]
        assert set(indices[n]) == set(want), n
        assert len(set(indices[n] // 4)) <= 2
    with pytest.raises(ValueError, match="node_limit"):
        cfg.replace(node_limit=3)  # Does not divide K = 4.


def test_node_limit_from_the_parallel_config(tmp_path):
    config = run_config(tmp_path, data=2, expert=4)
    config.parallel.node_limit = 1
    cfg = training_model_config(config, ModelConfig.from_dict(config.model))
    assert (cfg.node_groups, cfg.node_limit, cfg.moe_dispatch) == (4, 1, "ep")
    config.parallel.node_limit = 4
    with pytest.raises(ValueError, match="parallel.node_limit=4"):
        training_model_config(config, ModelConfig.from_dict(config.model))


def test_replicated_sharding_of_routing_biases(tmp_path):
    config = run_config(tmp_path, expert=8)
    cfg = training_model_config(config, ModelConfig.from_dict(config.model))
    shardings = placement.state_shardings(cfg, make_optimizer(config.train), mesh_lib.make_mesh(config.parallel))
    for s in jax.tree.leaves(shardings.routing, is_leaf=lambda x: isinstance(x, NamedSharding)):
        assert s.spec == PartitionSpec()


def test_variable_shapes_and_axes_are_traced_once_per_config_and_handed_out_fresh():
    """`abstract_variables` and `logical_axes` share one trace of the model per config: the shapes equal a
    real init's, a caller editing a returned tree changes nothing for the next caller, and another config
    gets its own shapes."""
    cfg = model_config()
    shapes = model.abstract_variables(cfg)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, model.init(cfg, jax.random.key(0)))
    assert jax.tree.structure(model.logical_axes(cfg)["params"]) == jax.tree.structure(shapes["params"])
    shapes["params"].clear()
    model.logical_axes(cfg)["params"].clear()
    assert model.abstract_variables(cfg)["params"] and model.logical_axes(cfg)["params"]
    wider = cfg.replace(hidden_size=2 * cfg.hidden_size)
    assert model.abstract_variables(wider)["params"]["embed_tokens"]["embedding"].shape[1] == 2 * cfg.hidden_size


def test_checkpoint_saved_on_one_mesh_restores_onto_another(tmp_path):
    """Sharded save (each device writes its shards) on data=2 x expert=4; restore onto expert=8, onto
    data=2 x tensor=2 x expert=2 and onto one device: the same values, in the target's shardings."""
    from deepseek_jax.train import checkpoint as checkpoint_lib

    config = run_config(tmp_path, data=2, expert=4)
    cfg = training_model_config(config, ModelConfig.from_dict(config.model))
    tx = make_optimizer(config.train)
    state = placement.init_sharded_state(cfg, tx, jax.random.key(1), mesh_lib.make_mesh(config.parallel))
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"), keep=1, async_save=False)
    ckpt.save(7, state, ema=None, data_state={"epoch": 1}, model_config=cfg)
    want = jax.device_get(state)
    for data, expert, tensor in [(1, 8, 1), (2, 2, 2), (1, 1, 1)]:
        target = run_config(tmp_path, data, expert, tensor)
        target_cfg = training_model_config(target, ModelConfig.from_dict(target.model))
        mesh = mesh_lib.make_mesh(target.parallel)
        shardings = placement.state_shardings(target_cfg, tx, mesh)
        like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), want, shardings)
        restored = ckpt.restore(7, like, ema_like=None, model_config=target_cfg)
        got = restored["state"]
        assert restored["data"] == {"epoch": 1}
        jax.tree.map(lambda g, s: (g.sharding == s) or pytest.fail(f"{g.sharding} != {s}"), got, shardings)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
    ckpt.close()


def test_logical_rules_come_from_the_parallel_config(tmp_path):
    """The MoE stack's layer axis goes over 'stage' only with a pipeline; parallel.rules overrides the
    parameters' names (here: the vocabulary replicated instead of split over 'tensor')."""
    config = run_config(tmp_path, tensor=2)
    rules = dict(mesh_lib.run_rules(config.parallel))
    assert rules["stage"] is None and rules["vocab"] == "tensor" and rules["batch"] == ("data", "expert")
    config.parallel.update(stage=2, tensor=1)
    assert dict(mesh_lib.run_rules(config.parallel))["stage"] == "stage"
    config.parallel.update(stage=1, tensor=2, rules="vocab=, heads=tensor, embed=data+expert")
    rules = mesh_lib.run_rules(config.parallel)
    assert dict(rules)["vocab"] is None and dict(rules)["embed"] == ("data", "expert")
    cfg = ModelConfig.from_dict(config.model)
    mesh = mesh_lib.make_mesh(config.parallel)
    shardings = placement.state_shardings(cfg, make_optimizer(config.train), mesh, rules)
    assert shardings.params["lm_head"]["kernel"].spec == PartitionSpec(("data", "expert"), None)
    default = placement.state_shardings(cfg, make_optimizer(config.train), mesh)
    assert default.params["lm_head"]["kernel"].spec == PartitionSpec(None, "tensor")


@pytest.mark.parametrize("rules, problem", [("vocab", "is not name=axis"), ("vocabulary=tensor", "names no logical"),
                                            ("expert=data", "moves 'expert'"), ("heads=model", "outside"),
                                            ("heads=tensor+tensor", "twice")])
def test_bad_rules_are_named(tmp_path, rules, problem):
    from deepseek_jax.train.validation import validate_run_config

    config = run_config(tmp_path)
    config.parallel.rules = rules
    with pytest.raises(ValueError, match=f"config.parallel.rules: .*{problem}"):
        validate_run_config(config)


def test_pipelined_checkpoints_restore_onto_a_plain_mesh_and_back(tmp_path):
    """A pipelined run's state (MoE stack over 'stage', the other parameters split over 'stage' too) saved
    and restored onto one device and onto data x expert, and a plain run's onto the pipeline's layout."""
    from deepseek_jax.train import checkpoint as checkpoint_lib

    def layout(stage=1, data=1, expert=1):
        c = run_config(tmp_path, data=data, expert=expert)
        c.model.num_hidden_layers = 3  # Two MoE layers: one per stage.
        c.parallel.update(stage=stage, microbatches=2)
        cfg = training_model_config(c, ModelConfig.from_dict(c.model))
        mesh = mesh_lib.make_mesh(c.parallel)
        return cfg, mesh, placement.state_shardings(cfg, make_optimizer(c.train), mesh)

    cfg, mesh, pipelined = layout(stage=2, data=2)
    embedding = pipelined.params["embed_tokens"]["embedding"]
    assert "stage" in embedding.spec and "stage" in pipelined.params["moe_layers"]["mlp"]["experts"]["up_proj"].spec
    tx = make_optimizer(run_config(tmp_path).train)
    state = placement.init_sharded_state(cfg, tx, jax.random.key(2), mesh)
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
    ckpt.save(1, state, ema=None, data_state={}, model_config=cfg)
    want = jax.device_get(state)
    for target in (dict(), dict(data=2, expert=4), dict(stage=2, data=2), dict(stage=2, expert=4)):
        target_cfg, _, shardings = layout(**target)
        like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), want, shardings)
        got = ckpt.restore(1, like, ema_like=None, model_config=target_cfg)["state"]
        jax.tree.map(lambda g, s: (g.sharding == s) or pytest.fail(f"{g.sharding} != {s}"), got, shardings)
        chex.assert_trees_all_equal(jax.device_get(got), want)
        if not target:  # And back: the plain state saved, restored into the pipeline's layout.
            ckpt.save(2, got, ema=None, data_state={}, model_config=target_cfg)
            like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), want, pipelined)
            back = ckpt.restore(2, like, ema_like=None, model_config=cfg)["state"]
            chex.assert_trees_all_equal(jax.device_get(back), want)
    ckpt.close()
