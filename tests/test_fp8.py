"""Fine-grained FP8 (deepseek_jax.ops.fp8) against independent NumPy loops over tiles and blocks.

The references (fp8_reference.py) quantise tile by tile with ml_dtypes' FP8 casts and accumulate in
float64; the JAX GEMMs may differ from them by float32 rounding only.
"""

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from fp8_reference import (
    assert_within_f32_rounding,
    gaussian,
    np_quant,
    np_quant_blocks,
    np_quant_rows,
    ref_dgrad,
    ref_fprop,
    ref_wgrad,
    rel_err,
)

from deepseek_jax.ops import fp8
from deepseek_jax.ops.fp8 import (
    Fp8Recipe,
    PerTensorFp8Recipe,
    dequantize_blockwise_2d,
    dequantize_tiles,
    fp8_matmul,
    quantize_blockwise_2d,
    quantize_per_tensor,
    quantize_tiles,
)


@functools.partial(jax.jit, static_argnums=0)
def forward_backward(recipe, x, w, dy):
    """(y, dx, dw) of recipe.matmul(x, w) with output cotangent dy, jitted (eager dispatch is slow)."""
    y, vjp = jax.vjp(recipe.matmul, x, w)
    return (y, *vjp(dy))


@functools.partial(jax.jit, static_argnums=(1, 2))
def round_trip(x, tile, axis):
    """quantize_tiles then dequantize_tiles: (q, scale_inv, x_deq)."""
    q, s = quantize_tiles(x, tile, axis=axis)
    return q, s, dequantize_tiles(q, s, tile, axis=axis)


# ---------------------------------------------------------------- quantise / dequantise


@pytest.mark.parametrize("log2_scale", [-20, -3, 0, 10])
@pytest.mark.parametrize("tile", [8, 128])
def test_round_trip_exact_for_representable_values(log2_scale, tile):
    rng = np.random.default_rng(0)
    v = rng.integers(0, 256, size=(6, 3 * tile), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    v = np.where(np.isnan(v.astype(np.float32)), 0, v.astype(np.float32))
    v[:, ::tile] = 448.0  # every tile's amax is 448 * 2**log2_scale, so scale_inv = 2**log2_scale
    x = (v * np.float32(2.0**log2_scale)).astype(np.float32)
    q, s, deq = round_trip(jnp.asarray(x), tile, -1)
    np.testing.assert_array_equal(np.asarray(s), 2.0**log2_scale)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), v)
    np.testing.assert_array_equal(np.asarray(deq), x)


@pytest.mark.parametrize(
    "shape,tile,axis", [((37, 300), 128, 1), ((37, 300), 8, 1), ((300, 5), 128, 0)]
)
def test_round_trip_error_bound(shape, tile, axis):
    """Per element |x - deq| <= max(|x| 2**-4, scale_inv 2**-10); per tile <= amax / 28."""
    rng = np.random.default_rng(1)
    x = gaussian(1, shape) * np.exp(3 * rng.standard_normal(shape)).astype(np.float32)
    _, s, deq = round_trip(jnp.asarray(x), tile, axis)
    err = np.abs(np.asarray(deq) - x)
    s_elem = np.repeat(np.asarray(s), tile, axis=axis)[tuple(slice(0, n) for n in shape)]
    bound = np.maximum(np.abs(x) * 2.0**-4, s_elem * 2.0**-10) * (1 + 2.0**-20)
    assert np.all(err <= bound)
    assert np.max(err / bound) > 0.9  # the bound is tight: rounding really is to 3 mantissa bits
    amax = s_elem * 448.0
    assert np.all(err <= amax / 28 * (1 + 2.0**-20))


@pytest.mark.parametrize(
    "shape,tile,axis", [((5, 300), 128, 1), ((5, 300), 8, 1), ((50, 7), 16, 0)]
)
def test_quantize_tiles_matches_numpy_loop_with_edge_tiles(shape, tile, axis):
    x = gaussian(2, shape)
    x[..., -1] *= 50.0  # partial edge tiles must not take their scale from padding or neighbours
    q, s, _ = round_trip(jnp.asarray(x), tile, axis)
    xt = x if axis == 1 else x.T
    q_ref, s_ref = np_quant_rows(xt, tile)
    if axis == 0:
        q_ref, s_ref = q_ref.T, s_ref.T
    assert s.shape == s_ref.shape and q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float64), q_ref)


def test_all_zero_tiles_give_zeros_not_nan():
    x = gaussian(3, (4, 40))
    x[1] = 0.0
    x[:, 16:32] = 0.0
    _, s, deq = round_trip(jnp.asarray(x), 16, -1)
    assert np.all(np.isfinite(np.asarray(s))) and np.all(np.asarray(s) > 0)
    deq = np.asarray(deq)
    assert np.all(deq[1] == 0) and np.all(deq[:, 16:32] == 0) and np.all(np.isfinite(deq))
    w = gaussian(4, (40, 24))
    y, dx, dw = forward_backward(Fp8Recipe(tile=16), x, w, np.ones((4, 24), np.float32))
    assert np.all(np.asarray(y)[1] == 0)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in (y, dx, dw))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_inputs_propagate(bad):
    x = gaussian(5, (3, 32))
    x[1, 20] = bad  # tile (row 1, channels 16..31) of the 16-wide tiles
    deq = np.asarray(round_trip(jnp.asarray(x), 16, -1)[2])
    assert np.all(np.isnan(deq[1, 16:32]))
    assert np.all(np.isfinite(np.delete(deq, 1, axis=0))) and np.all(np.isfinite(deq[1, :16]))
    w = gaussian(6, (32, 8))
    y = np.asarray(jax.jit(Fp8Recipe(tile=16).matmul)(x, w))
    assert np.all(~np.isfinite(y[1])) and np.all(np.isfinite(np.delete(y, 1, axis=0)))
    assert np.all(~np.isfinite(np.asarray(jax.jit(PerTensorFp8Recipe().matmul)(x, w))))
    q, s = quantize_blockwise_2d(jnp.asarray(x.T), 16)
    assert np.all(np.isnan(np.asarray(dequantize_blockwise_2d(q, s, 16))[16:32, :]))


# ---------------------------------------------------------------- checkpoint blocks


@pytest.mark.parametrize("shape,block", [((200, 300), 128), ((256, 128), 128), ((45, 70), 16)])
def test_blockwise_2d_matches_numpy_loop(shape, block):
    w = gaussian(7, shape) * np.exp(np.random.default_rng(7).standard_normal((1, shape[1])))
    q, s = jax.jit(quantize_blockwise_2d, static_argnums=1)(jnp.asarray(w), block)
    q_ref, s_ref = np_quant_blocks(w, block)
    assert s.shape == (-(-shape[0] // block), -(-shape[1] // block)) and s.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float64), q_ref)
    deq_ref = np.zeros(shape, np.float32)  # w = q * scale_inv per block, in float32
    for i in range(s_ref.shape[0]):
        for j in range(s_ref.shape[1]):
            blk = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            deq_ref[blk] = q_ref[blk].astype(np.float32) * s_ref[i, j]
    np.testing.assert_array_equal(np.asarray(dequantize_blockwise_2d(q, s, block)), deq_ref)
    # A checkpoint loaded as NumPy (ml_dtypes FP8 + float32 grid) dequantises the same way.
    np_q = np.asarray(q)
    np.testing.assert_array_equal(
        np.asarray(dequantize_blockwise_2d(np_q, np.asarray(s), block)), deq_ref
    )


def test_blockwise_2d_deepseek_shape_and_bad_grid():
    q, s = jax.eval_shape(quantize_blockwise_2d, jax.ShapeDtypeStruct((576, 7168), jnp.bfloat16))
    assert q.shape == (576, 7168) and q.dtype == jnp.float8_e4m3fn and s.shape == (5, 56)
    q, s = quantize_blockwise_2d(jnp.ones((200, 300)))
    with pytest.raises(ValueError, match=r"needs \(2, 3\)"):
        dequantize_blockwise_2d(q, s.T)


# ---------------------------------------------------------------- GEMMs


GEMM_CASES = [(50, 300, 200, 128), (50, 300, 200, 8), (256, 256, 128, 128), (9, 40, 24, 16)]


@pytest.mark.parametrize("n,k,m,tile", GEMM_CASES)
def test_fprop_matches_numpy_reference(n, k, m, tile):
    x, w = gaussian(10, (n, k)), gaussian(11, (k, m), 0.05)
    y = jax.jit(fp8_matmul, static_argnums=2)(x, w, tile)
    assert y.shape == (n, m) and y.dtype == jnp.float32
    assert_within_f32_rounding(y, ref_fprop(x, w, tile), k)


@pytest.mark.parametrize("n,k,m,tile", GEMM_CASES)
@pytest.mark.parametrize("grad_dtype", [fp8.E4M3, fp8.E5M2])
def test_dgrad_wgrad_match_numpy_reference(n, k, m, tile, grad_dtype):
    x, w, dy = gaussian(12, (n, k)), gaussian(13, (k, m), 0.05), gaussian(14, (n, m), 1e-3)
    recipe = Fp8Recipe(tile=tile, grad_fp8_dtype=grad_dtype)
    # Leading dims are flattened into tokens.
    _, dx, dw = forward_backward(recipe, x.reshape(1, n, k), w, dy.reshape(1, n, m))
    assert dx.shape == (1, n, k) and dw.shape == (k, m)
    assert_within_f32_rounding(dx[0], ref_dgrad(dy, w, tile, grad_dtype), m)
    assert_within_f32_rounding(dw, ref_wgrad(x, dy, tile, grad_dtype), n)


def test_relative_error_against_float32_matmul():
    """Gaussian data: E4M3 1 x 128 / 128 x 128 round trips have ~2.6% rms relative error, so
    y and dx (two roundings) are ~3.7% off and dw (x rounded twice + dy) ~4.5%."""
    x, w = gaussian(20, (4, 64, 512)), gaussian(21, (512, 384), 0.05)
    dy = gaussian(22, (4, 64, 384))
    y, dx, dw = forward_backward(Fp8Recipe(), x, w, dy)
    x2, dy2 = x.reshape(-1, 512).astype(np.float64), dy.reshape(-1, 384).astype(np.float64)
    errs = (
        rel_err(y, x @ w.astype(np.float64)),
        rel_err(dx, dy @ w.T.astype(np.float64)),
        rel_err(dw, x2.T @ dy2),
    )
    assert all(0.01 < e < 0.05 for e in errs[:2]), errs  # > 1%: FP8 really is in effect
    assert 0.01 < errs[2] < 0.06, errs


def test_output_and_gradient_dtypes_follow_primals():
    x, w = jnp.asarray(gaussian(23, (2, 8, 32)), jnp.bfloat16), jnp.asarray(gaussian(24, (32, 16)))
    y, dx, dw = forward_backward(Fp8Recipe(tile=16), x, w, jnp.ones((2, 8, 16), jnp.bfloat16))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    assert y.shape == (2, 8, 16) and dx.shape == x.shape and dw.shape == w.shape


def _dot_signatures(hlo: str) -> list[str]:
    return re.findall(r"stablehlo\.dot_general .*?: (\(.*?\) -> tensor<[^>]*>)", hlo)


def test_lowered_grad_has_three_fp8_gemms():
    x, w = jnp.ones((16, 256)), jnp.ones((256, 384))
    def loss(x, w):
        return jnp.sum(jnp.sin(Fp8Recipe().matmul(x, w)))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    sigs = _dot_signatures(hlo)
    f8, f32 = "xf8E4M3FN>", "xf32>"
    fprop = f"(tensor<16x2x128{f8}, tensor<2x128x384{f8}) -> tensor<2x16x384{f32}"
    dgrad = f"(tensor<16x3x128{f8}, tensor<3x128x256{f8}) -> tensor<3x16x256{f32}"
    wgrad = f"(tensor<256x1x128{f8}, tensor<1x128x384{f8}) -> tensor<1x256x384{f32}"
    assert sorted(sigs) == sorted([fprop, dgrad, wgrad]), sigs  # and no high-precision GEMM


# ---------------------------------------------------------------- per-tensor baseline


@pytest.mark.parametrize("outlier,per_tensor_min_err", [(1e5, 0.2), (1e6, 0.99)])
def test_per_tensor_scaling_loses_small_channels(outlier, per_tensor_min_err):
    """One channel `outlier` x larger than the rest. E4M3 spans 448 / 2**-9 ~ 2.3e5, so per-tensor
    scaling flushes the other channels once the outlier passes ~1e5 (at 1e3 both recipes are at
    ~2.6%); 1 x 128 tiles confine the outlier to its own tile and keep the other tiles intact."""
    x = gaussian(30, (64, 512))
    x[:, 3] *= outlier
    w = gaussian(31, (512, 64))
    w[:128] = 0.0  # y depends only on the small channels (tiles 1..3)
    small = slice(128, None)
    blockwise = np.asarray(round_trip(jnp.asarray(x), 128, -1)[2])
    q, s = jax.jit(quantize_per_tensor)(jnp.asarray(x))
    per_tensor = np.asarray(q, np.float32) * np.asarray(s)
    assert rel_err(blockwise[:, small], x[:, small]) < 0.04
    assert rel_err(per_tensor[:, small], x[:, small]) > per_tensor_min_err
    y = x.astype(np.float64) @ w
    assert rel_err(jax.jit(Fp8Recipe().matmul)(x, w), y) < 0.05
    assert rel_err(jax.jit(PerTensorFp8Recipe().matmul)(x, w), y) > per_tensor_min_err


def test_per_tensor_grads_match_numpy_reference():
    x, w, dy = gaussian(32, (20, 48)), gaussian(33, (48, 24)), gaussian(34, (20, 24))
    y, dx, dw = forward_backward(PerTensorFp8Recipe(), x, w, dy)
    (xq, xs), (wq, ws), (dyq, dys) = np_quant(x), np_quant(w), np_quant(dy)
    gemms = [(y, xq, xs, wq, ws), (dx, dyq, dys, wq.T, ws), (dw, xq.T, xs, dyq, dys)]
    for got, a, sa, b, sb in gemms:
        ref = (a @ b) * float(sa) * float(sb)
        ref_abs = (np.abs(a) @ np.abs(b)) * float(sa) * float(sb)
        assert_within_f32_rounding(got, (ref, ref_abs), a.shape[1])


# ---------------------------------------------------------------- recipe object


def test_recipe_is_hashable_and_validated():
    assert Fp8Recipe() == Fp8Recipe(128, "float8_e4m3fn") and hash(Fp8Recipe()) == hash(Fp8Recipe())
    assert hash(PerTensorFp8Recipe()) == hash(PerTensorFp8Recipe())
    with pytest.raises(ValueError, match="tile"):
        Fp8Recipe(tile=0)
    with pytest.raises(ValueError, match="fp8_dtype"):
        Fp8Recipe(fp8_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="w \\[K, M\\]"):
        Fp8Recipe().matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))
