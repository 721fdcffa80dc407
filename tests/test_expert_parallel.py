"""Expert-parallel dispatch (shard_map + all-to-all) == the dense reference, on 8 simulated devices.

Forward and gradients on three meshes; capacity drops against an independent NumPy count; dropless never
drops, even when every token goes to one device; the byte counters; clear errors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ep_traffic import dispatch_bytes, payload_rows
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.model.experts import dense_dispatch
from deepseek_jax.parallel.expert_parallel import ExpertParallelInShardMap, capacity, ep_dispatch

AXES = ("stage", "data", "expert", "tensor")
D, F = 8, 4
MESHES = {"expert8": (1, 1, 8, 1), "data2_expert4": (1, 2, 4, 1), "data2_expert2_tensor2": (1, 2, 2, 2)}


def make_mesh(shape):
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def problem(N, E, seed=0):
    """Random tokens, expert weights and an output cotangent, float32 (NumPy: no eager compiles)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return normal(N, D), (normal(E, D, F) * 0.3, normal(E, D, F) * 0.3, normal(E, F, D) * 0.3), normal(N, D)


def random_routing(N, K, allowed, seed):
    """K distinct experts per token from `allowed` (as top-k gives), with random float32 weights."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(allowed, K, replace=False) for _ in range(N)]).astype(np.int32)
    return rng.uniform(0.1, 1.0, (N, K)).astype(np.float32), idx


def crafted_routing(N, E=16, K=2):
    """Experts 1 and 12..15 receive nothing (with ep=8, devices 6 and 7 receive nothing at all); the first
    quarter of the tokens send both pairs to one device for every ep (pairs 2j, 2j+1); the rest random."""
    allowed = [e for e in range(E) if e != 1 and e < 12]
    weights, idx = random_routing(N, K, allowed, seed=1)
    for t in range(N // 4):
        idx[t] = [2 * (1 + t % 5), 2 * (1 + t % 5) + 1]
    return weights, idx


def shard_inputs(mesh, x, weights, idx, w):
    tokens, experts = NamedSharding(mesh, P(("data", "expert"))), NamedSharding(mesh, P("expert"))
    return (jax.device_put(x, tokens), jax.device_put(weights, tokens), jax.device_put(idx, tokens),
            tuple(jax.device_put(a, experts) for a in w))


def forward_and_grads(dispatch, x, weights, idx, w, ct):
    """dispatch(...) -> (y, aux). Returns y, aux and d(sum y*ct)/d(x, weights, gate, up, down)."""
    loss = lambda x, weights, w: jnp.sum(dispatch(x, weights, idx, w)[0] * ct)  # noqa: E731
    return *dispatch(x, weights, idx, w), jax.grad(loss, argnums=(0, 1, 2))(x, weights, w)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("case", ["crafted", "small"])
def test_ep_equals_dense_forward_and_grads(mesh_name, case):
    if case == "crafted":
        N, E, K = 64, 16, 2
        weights, idx = crafted_routing(N, E, K)
    else:  # 16 tokens over 8 (or 4) batch shards: 2 (or 4) tokens per device.
        N, E, K = 16, 8, 3
        weights, idx = random_routing(N, K, list(range(E)), seed=2)
    x, w, ct = problem(N, E)
    mesh = make_mesh(MESHES[mesh_name])

    dense = lambda *a: (dense_dispatch(*a), 0.0)  # noqa: E731
    with jax.set_mesh(mesh):
        y, dropped, grads = jax.jit(lambda *a: forward_and_grads(ep_dispatch, *a, ct))(
            *shard_inputs(mesh, x, weights, idx, w))
    want_y, _, want_grads = jax.jit(lambda *a: forward_and_grads(dense, *a, ct))(x, weights, idx, w)
    assert float(dropped) == 0
    np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), atol=1e-5, rtol=1e-5)
    for name, got, want in zip(["x", "weights", "gate", "up", "down"], jax.tree.leaves(grads),
                               jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5, err_msg=name)


def numpy_drops(idx, E, ep, shards, C):
    """Independent rule: per source shard, pairs in (token, k) order; a destination keeps its first C."""
    N, K = idx.shape
    n, E_l = N // shards, E // ep
    kept = np.ones((N, K), bool)
    for s in range(shards):
        seen = np.zeros(ep, int)
        for t in range(s * n, (s + 1) * n):
            for k in range(K):
                dest = idx[t, k] // E_l
                kept[t, k] = seen[dest] < C
                seen[dest] += 1
    return kept


@pytest.mark.parametrize("mesh_name, capacity_factor, routing", [
    ("data2_expert4", 0.5, "overload_device_1"), ("expert8", 1.0, "random")])
def test_capacity_drops_match_numpy(mesh_name, capacity_factor, routing):
    N, E, K = 64, 16, 2
    shape = MESHES[mesh_name]
    ep, shards = shape[2], shape[1] * shape[2]
    if routing == "random":
        weights, idx = random_routing(N, K, list(range(E)), seed=3)
    else:  # Three quarters of the tokens put both pairs on device 1 (experts 4..7 when ep=4).
        weights, idx = random_routing(N, K, list(range(E)), seed=4)
        idx[: 3 * N // 4] = [[4 + t % 4, 4 + (t + 1) % 4] for t in range(3 * N // 4)]
    C = math.ceil(capacity_factor * (N // shards) * K / ep)
    kept = numpy_drops(idx, E, ep, shards, C)
    assert (~kept).sum() > 0
    x, w, _ = problem(N, E)
    with jax.set_mesh(make_mesh(shape)):
        y, dropped = jax.jit(lambda *a: ep_dispatch(*a, capacity_factor=capacity_factor))(x, weights, idx, w)
    assert float(dropped) == (~kept).sum()
    want = jax.jit(dense_dispatch)(x, np.where(kept, weights, 0), idx, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_dispatch_inside_a_shard_map_matches_numpy(capacity_factor):
    """The dispatch a pipeline stage runs (already inside a shard_map: its rows, its E/ep experts): the
    same kept pairs as the NumPy rule, per device, and the dense output of those pairs."""
    N, E, K = 64, 16, 2
    shape = MESHES["data2_expert4"]
    ep, shards = shape[2], shape[1] * shape[2]
    weights, idx = random_routing(N, K, list(range(E)), seed=4)
    idx[: 3 * N // 4] = [[4 + t % 4, 4 + (t + 1) % 4] for t in range(3 * N // 4)]  # Overload device 1.
    C = capacity(N // shards, K, E // ep, ep, capacity_factor)
    kept = numpy_drops(idx, E, ep, shards, C)
    assert (~kept).sum() > 0 if capacity_factor else (~kept).sum() == 0
    x, w, _ = problem(N, E)
    dispatch = ExpertParallelInShardMap(ep=ep, capacity_factor=capacity_factor)
    assert dispatch.experts_held(E) == E // ep
    tokens, experts = P(("data", "expert")), P("expert")
    body = jax.shard_map(lambda *a: (lambda y, d: (y, d[None]))(*dispatch(a[0], a[1], a[2], a[3:], None)),
                         mesh=make_mesh(shape), in_specs=(tokens, tokens, tokens, experts, experts, experts),
                         out_specs=(tokens, tokens), axis_names=frozenset({"data", "expert"}))
    y, dropped = jax.jit(body)(x, weights, idx, *w)
    assert dropped.shape == (shards,) and float(dropped.sum()) == (~kept).sum()
    want = jax.jit(dense_dispatch)(x, np.where(kept, weights, 0), idx, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ["random", "all_to_device_0"])
def test_dropless_never_drops(routing):
    N, E, K = 64, 16, 2
    if routing == "random":
        weights, idx = random_routing(N, K, list(range(E)), seed=5)
    else:  # Every token picks experts 0 and 1: both live on device 0 (E_l = 2), which gets every pair.
        weights, idx = random_routing(N, K, [0, 1], seed=5)
    x, w, _ = problem(N, E)
    with jax.set_mesh(make_mesh(MESHES["expert8"])):
        y, dropped = jax.jit(ep_dispatch)(x, weights, idx, w)
    assert float(dropped) == 0
    np.testing.assert_allclose(np.asarray(y), np.asarray(jax.jit(dense_dispatch)(x, weights, idx, w)),
                               atol=1e-5, rtol=1e-5)


def test_capacity_rule():
    assert capacity(n=8, K=2, E_l=4, ep=4, capacity_factor=0) == 16  # Dropless: n * min(K, E_l).
    assert capacity(n=8, K=8, E_l=2, ep=8, capacity_factor=0) == 16
    assert capacity(n=8, K=2, E_l=4, ep=4, capacity_factor=0.5) == 2  # ceil(0.5 * 8*2/4).
    assert capacity(n=8, K=2, E_l=4, ep=4, capacity_factor=1e-3) == 1
    assert capacity(n=8, K=2, E_l=4, ep=4, capacity_factor=100) == 16  # Never beyond dropless.
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity(n=8, K=2, E_l=4, ep=4, capacity_factor=-1)


def test_byte_counters():
    got = dispatch_bytes(n_tokens_per_device=8, K=2, D=16, ep=4, capacity=16, itemsize=2)
    assert got["ep_dispatch"] == got["ep_combine"] == 3 * 16 * 16 * 2
    assert got["ep_total"] == 2 * 3 * 16 * 16 * 2 + 3 * 16 * 4
    assert got["allgather"] == got["reduce_scatter"] == 3 * 8 * 16 * 2
    fp8 = dispatch_bytes(n_tokens_per_device=8, K=2, D=160, ep=4, capacity=16, itemsize=2, fp8_tile=128)
    assert fp8["ep_dispatch"] == 3 * 16 * (160 + 4 * 2)  # FP8 values + two float32 tile scales per row.
    assert fp8["ep_combine"] == 3 * 16 * 160 * 2
    idx = np.array([[0, 1], [2, 7], [7, 6], [3, 0]])  # E=8 on ep=4, 2 batch shards of 2 tokens.
    np.testing.assert_array_equal(payload_rows(idx, E=8, ep=4, batch_shards=2), [[2, 1, 0, 1], [1, 1, 0, 2]])


def test_errors():
    N, E, K = 16, 12, 2
    weights, idx = random_routing(N, K, list(range(8)), seed=6)
    x, w, _ = problem(N, E)
    with pytest.raises(ValueError, match="needs a mesh with an 'expert' axis"):
        ep_dispatch(x, weights, idx, w)
    no_expert = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(no_expert), pytest.raises(ValueError, match="needs a mesh with an 'expert' axis"):
        ep_dispatch(x, weights, idx, w)
    with jax.set_mesh(make_mesh(MESHES["expert8"])):
        with pytest.raises(ValueError, match="E=12 must be divisible by the 'expert' axis size ep=8"):
            ep_dispatch(x, weights, idx, w)
        x, w, _ = problem(12, 16)
        with pytest.raises(ValueError, match="N=12 must be divisible by the 8 batch shards"):
            ep_dispatch(x, weights[:12], idx[:12], w)
        with pytest.raises(ValueError, match="capacity_factor"):
            ep_dispatch(x[:8], weights[:8], idx[:8], w, capacity_factor=-0.5)
