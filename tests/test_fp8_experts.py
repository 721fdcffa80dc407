"""The routed experts in FP8 (ops/fp8_grouped.py): grouped GEMMs against NumPy loops, and the dispatches.

The grouped references loop over groups and call the dense references of fp8_reference.py on each
group's rows: 1 x t tiles of x and dy restart at every row, t x t blocks at every expert, and the
Wgrad t x 1 tiles restart at every group's first row. JAX may differ from them by float32 rounding.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import micro_run_config
from fp8_reference import (
    assert_within_f32_rounding,
    gaussian,
    np_quant,
    ref_dgrad,
    ref_fprop,
    ref_wgrad,
    rel_err,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.experts import RoutedExperts, block_rows, num_blocks, ragged_dispatch
from deepseek_jax.ops import fp8
from deepseek_jax.ops.fp8 import Fp8Recipe, PerTensorFp8Recipe
from deepseek_jax.ops.fp8_grouped import fp8_ragged_dot, fp8_routed_ragged_dots
from deepseek_jax.parallel.expert_parallel import ExpertParallel, ep_dispatch
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.optimizer import make_optimizer

AXES = ("stage", "data", "expert", "tensor")


def group_rows(sizes):
    """(g, rows of group g) in order; the rows past sum(sizes) belong to no group."""
    ends = np.cumsum(sizes)
    return [(g, slice(e - m, e)) for g, (m, e) in enumerate(zip(sizes, ends))]


@functools.partial(jax.jit, static_argnums=0)
def grouped_forward_backward(gemm, x, w, sizes, dy):
    y, vjp = jax.vjp(lambda x, w: gemm(x, w, sizes), x, w)
    return (y, *vjp(dy))


# (M, K, N, tile, group sizes, dy's FP8 dtype): partial tiles along M, K and N; empty groups; groups
# that are not a multiple of the tile (130 = 128 + 2 straddles a tile boundary); rows past the groups
# (300 > 270); E5M2 gradients (the hybrid-format baseline).
CASES = [(300, 200, 150, 128, (130, 0, 100, 40), fp8.E4M3), (50, 40, 24, 16, (0, 37, 13, 0), fp8.E4M3),
         (50, 40, 24, 16, (0, 37, 13, 0), fp8.E5M2), (64, 48, 40, 16, (64, 0, 0), fp8.E4M3)]


@pytest.mark.parametrize("M,K,N,tile,sizes,grad_dtype", CASES)
def test_grouped_gemms_match_numpy_loops(M, K, N, tile, sizes, grad_dtype):
    x, w = gaussian(40, (M, K)), gaussian(41, (len(sizes), K, N), 0.05)
    dy = gaussian(42, (M, N), 1e-3)
    gemm = functools.partial(fp8_ragged_dot, tile=tile, grad_dtype=grad_dtype)
    y, dx, dw = grouped_forward_backward(gemm, x, w, np.asarray(sizes, np.int32), dy)
    assert (y.shape, dx.shape, dw.shape) == ((M, N), (M, K), w.shape)
    done = sum(sizes)
    assert np.all(np.asarray(y)[done:] == 0) and np.all(np.asarray(dx)[done:] == 0)
    for g, rows in group_rows(sizes):
        if rows.start == rows.stop:
            assert np.all(np.asarray(dw[g]) == 0)
            continue
        assert_within_f32_rounding(y[rows], ref_fprop(x[rows], w[g], tile), K)
        assert_within_f32_rounding(dx[rows], ref_dgrad(dy[rows], w[g], tile, grad_dtype), N)
        rows_g = rows.stop - rows.start
        assert_within_f32_rounding(dw[g], ref_wgrad(x[rows], dy[rows], tile, grad_dtype), rows_g)


def test_per_tensor_grouped_gemms_match_numpy():
    """One scale for x, one per expert's weight, one for dy."""
    sizes = (20, 0, 13)
    x, w, dy = gaussian(43, (40, 24)), gaussian(44, (3, 24, 16)), gaussian(45, (40, 16))
    gemm = PerTensorFp8Recipe().grouped
    y, dx, dw = grouped_forward_backward(gemm, x, w, np.asarray(sizes, np.int32), dy)
    (xq, xs), (dyq, dys) = np_quant(x), np_quant(dy)
    for g, rows in group_rows(sizes):
        wq, ws = np_quant(w[g])
        for got, a, sa, b, sb in [(y[rows], xq[rows], xs, wq, ws), (dx[rows], dyq[rows], dys, wq.T, ws),
                                  (dw[g], xq[rows].T, xs, dyq[rows], dys)]:
            scale = float(sa) * float(sb)
            assert_within_f32_rounding(got, ((a @ b) * scale, (np.abs(a) @ np.abs(b)) * scale), a.shape[1])
    assert np.all(np.asarray(y)[33:] == 0) and np.all(np.asarray(dw[1]) == 0)


def _residuals(fn, *args):
    """Shapes and dtypes of the arrays a vjp keeps for the backward pass (traced, not run)."""
    return [(r.shape, r.dtype) for r in jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args))]


def test_residuals_are_fp8_not_float32_activations():
    x, w = gaussian(46, (300, 200)), gaussian(47, (4, 200, 150))
    sizes = np.asarray((130, 0, 100, 40), np.int32)
    res = _residuals(lambda x, w: fp8_ragged_dot(x, w, sizes), x, w)
    assert ((300, 200), jnp.float8_e4m3fn) in res and ((4, 200, 150), jnp.float8_e4m3fn) in res
    assert ((300, 2), jnp.float32) in res and ((4, 2, 2), jnp.float32) in res  # tile / block scales
    assert not [r for r in res if r[0] in (x.shape, w.shape) and r[1] != jnp.float8_e4m3fn], res
    # The dispatch form keeps the routed FP8 rows [M, K], once for the gate and up projections.
    x_n = gaussian(48, (150, 200))
    rows = np.repeat(np.arange(150), 2)
    res = _residuals(lambda x, a, b: fp8_routed_ragged_dots(
        x, (a, b), sizes, lambda v, r: v[r], (rows,)), x_n, w, w)
    assert [r[0] for r in res if r[1] == jnp.float8_e4m3fn] == [(300, 200), (4, 200, 150), (4, 200, 150)]
    assert not [r for r in res if r[0] in ((150, 200), (300, 200)) and r[1] != jnp.float8_e4m3fn], res


def expert_problem(N, D, F, E, K, seed):
    """Tokens x [N, D], routing weights [N, K] and K distinct experts per token, expert weights
    (gate, up, down) and an output cotangent [N, D]; float32."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    w = (normal(E, D, F) * 0.1, normal(E, D, F) * 0.1, normal(E, F, D) * 0.1)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(N)]).astype(np.int32)
    return normal(N, D), rng.uniform(0.1, 1, (N, K)).astype(np.float32), idx, w, normal(N, D)


def forward_and_grads(dispatch, x, weights, idx, w, ct):
    """y and d(sum y*ct)/d(x, weights, w)."""
    loss = lambda x, weights, w: jnp.sum(dispatch(x, weights, idx, w) * ct)  # noqa: E731
    return dispatch(x, weights, idx, w), jax.grad(loss, argnums=(0, 1, 2))(x, weights, w)


def test_fp8_ragged_experts_track_float32():
    """Three chained FP8 GEMMs, 128-tiles on D=256 and F=160. Every E4M3 rounding (x, the weights, the
    SwiGLU output h, dy) is ~2.6% rms and they compound: measured y 6.3%, dx 6.6%, d(weights) 6.9%,
    d(gate, up, down) 7.1%, 6.8%, 6.5% (relative Frobenius) off float32. Bound: 10%; floor 1%, so FP8
    is really in effect."""
    x, weights, idx, w, ct = expert_problem(N=96, D=256, F=160, E=4, K=2, seed=0)
    run = jax.jit(lambda recipe, *a: forward_and_grads(functools.partial(ragged_dispatch, recipe=recipe), *a),
                  static_argnums=0)
    y8, g8 = run(Fp8Recipe(), x, weights, idx, w, ct)
    y32, g32 = run(None, x, weights, idx, w, ct)
    errs = {"y": rel_err(y8, y32)} | {name: rel_err(a, b) for name, a, b in zip(
        ["dx", "d_weights", "d_gate", "d_up", "d_down"], jax.tree.leaves(g8), jax.tree.leaves(g32))}
    assert all(0.01 < e < 0.10 for e in errs.values()), errs


def test_ep_with_fp8_payload_equals_ragged_fp8():
    """Mesh (data=2, expert=4). Fprop and Dgrad are row-wise, so y, dx and d(weights) equal the
    single-device FP8 'ragged' dispatch up to float32 rounding. Each data shard tiles its experts'
    token rows for Wgrad on its own, so dw equals the sum of 'ragged' FP8 over the two halves of the
    batch (and only approximately the single-device dw)."""
    x, weights, idx, w, ct = expert_problem(N=64, D=40, F=24, E=8, K=2, seed=1)
    recipe = Fp8Recipe(tile=16)
    mesh = jax.make_mesh((1, 2, 4, 1), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    tokens, experts = NamedSharding(mesh, P(("data", "expert"))), NamedSharding(mesh, P("expert"))
    args = (jax.device_put(x, tokens), jax.device_put(weights, tokens), jax.device_put(idx, tokens),
            tuple(jax.device_put(a, experts) for a in w), jax.device_put(ct, tokens))
    ep = lambda *a: ep_dispatch(*a, recipe=recipe)[0]  # noqa: E731
    with jax.set_mesh(mesh):
        y, grads = jax.jit(lambda *a: forward_and_grads(ep, *a))(*args)
    ragged = jax.jit(lambda *a: forward_and_grads(functools.partial(ragged_dispatch, recipe=recipe), *a))
    want_y, want = ragged(x, weights, idx, w, ct)
    halves = [ragged(*(a[s] for a in (x, weights, idx)), w, ct[s])[1] for s in (slice(0, 32), slice(32, 64))]
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    close(np.asarray(y), np.asarray(want_y))
    close(np.asarray(grads[0]), np.asarray(want[0]), err_msg="dx")
    close(np.asarray(grads[1]), np.asarray(want[1]), err_msg="d_weights")
    for name, got, a, b in zip(["gate", "up", "down"], grads[2], halves[0][2], halves[1][2]):
        close(np.asarray(got), np.asarray(a + b), err_msg=name)
    assert rel_err(grads[2][0], want[2][0]) > 1e-4  # The tiles really differ from one device's.


def _custom_vjp_names(jaxpr) -> list[str]:
    """Names of the custom_vjp calls in a jaxpr and its sub-jaxprs (scan, shard_map, ...)."""
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_vjp_call":
            names.append(eqn.params["call_jaxpr"].jaxpr.debug_info.func_name)
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names += _custom_vjp_names(inner)
    return names


def test_routed_experts_module_wiring(tmp_path):
    """RoutedExperts passes its recipe to 'ragged' and 'ep' (two FP8 grouped calls: gate+up, down) and
    not to 'dense' (the reference); a matmul without grouped GEMMs is refused."""
    cfg = ModelConfig.from_dict(micro_run_config(tmp_path, write_corpus=False).model)
    x, weights, idx, _, _ = expert_problem(N=32, D=cfg.hidden_size, F=8, E=cfg.n_routed_experts, K=2, seed=2)
    variables = RoutedExperts(cfg).init(jax.random.key(0), x, weights, idx)

    def calls(dispatch, recipe):
        module = RoutedExperts(cfg.replace(moe_dispatch=dispatch), recipe=recipe,
                               dispatch=ExpertParallel() if dispatch == "ep" else None)
        return _custom_vjp_names(jax.make_jaxpr(lambda v: module.apply(v, x, weights, idx))(variables).jaxpr)

    assert calls("ragged", Fp8Recipe(tile=8)) == ["_fp8_grouped_gemms"] * 2
    assert calls("ragged", None) == []
    with jax.set_mesh(jax.make_mesh((1, 2, 4, 1), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)):
        assert calls("ep", Fp8Recipe(tile=8)) == ["_fp8_grouped_gemms"] * 2
        assert calls("ep", PerTensorFp8Recipe()) == ["_per_tensor"] * 3
    assert calls("ragged", PerTensorFp8Recipe()) == ["_per_tensor"] * 3  # The dispatch moves x unquantised.
    assert calls("dense", Fp8Recipe(tile=8)) == []
    with pytest.raises(ValueError, match="no grouped GEMMs"):
        calls("ragged", lambda a, b: a @ b)


def _dot_signatures(hlo: str) -> list[str]:
    return re.findall(r"stablehlo\.dot_general .*?: (\(.*?\) -> tensor<[^>]*>)", hlo)


def test_train_step_lowers_expert_gemms_to_fp8(tmp_path):
    """Micro model (E=4 experts, D=32, F=16, 64 routed rows per MoE block, tile 8), two MoE blocks (the
    stack and the MTP module). On CPU ragged_dot lowers to a dot_general over the expanded groups."""
    c = micro_run_config(tmp_path, write_corpus=False)
    cfg = ModelConfig.from_dict(c.model)
    tx = make_optimizer(c.train)
    state = jax.eval_shape(lambda: step_lib.init_state(cfg, tx, jax.random.key(0)))
    batch = {k: jax.ShapeDtypeStruct((2, 16), jnp.int32) for k in ("tokens", "segment_ids", "positions")}
    lower = lambda recipe: jax.jit(functools.partial(  # noqa: E731
        step_lib.train_step, cfg=cfg, train_cfg=c.train, tx=tx, recipe=recipe)).lower(state, batch).as_text()
    sigs = _dot_signatures(lower(Fp8Recipe(tile=8)))
    f8, f32 = "xf8E4M3FN>", "xf32>"
    gate_up_fprop = down_dgrad = f"(tensor<4x4x64x8{f8}, tensor<4x4x8x16{f8}) -> tensor<4x64x16{f32}"
    down_fprop = gate_up_dgrad = f"(tensor<4x2x64x8{f8}, tensor<4x2x8x32{f8}) -> tensor<2x64x32{f32}"
    # Wgrad: J = 64 // 8 + 4 token tiles.
    gate_up_wgrad = f"(tensor<12x8x32{f8}, tensor<12x8x16{f8}) -> tensor<12x32x16{f32}"
    down_wgrad = f"(tensor<12x8x16{f8}, tensor<12x8x32{f8}) -> tensor<12x16x32{f32}"
    expected = {gate_up_fprop: 2 * 3, down_fprop: 2 * 3, gate_up_wgrad: 2 * 2, down_wgrad: 2}
    assert {s: sigs.count(s) for s in expected} == expected
    # The expert weights, [E, D, F] / [E, F, D] or gathered per block of rows [blocks, D, F] (the CPU form
    # of the grouped GEMMs, model/experts.py), meet no high-precision dot (they do without FP8).
    blocks = num_blocks(64, 4, block_rows(64, 4))
    weight_operand = re.compile(rf"tensor<(4|{blocks})x(32x16|16x32)xf32>.* ->")
    assert not [s for s in sigs if weight_operand.search(s)]
    assert [s for s in _dot_signatures(lower(None)) if weight_operand.search(s)]
