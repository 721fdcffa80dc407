"""Independent NumPy references for the FP8 tests: explicit loops over tiles, blocks and slices.

They quantise tile by tile in float32 with ml_dtypes' FP8 casts, multiply exactly in float64 and
accumulate slice by slice in float64. The JAX GEMMs accumulate in float32, so they may differ from a
reference by float32 rounding only: |y - ref| <= (C + 3) * 2**-24 * |ref|_abs, where C is the
contraction length and |ref|_abs the same sum over absolute values.
"""

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from deepseek_jax.ops import fp8

NP_FP8 = {jnp.dtype(fp8.E4M3): ml_dtypes.float8_e4m3fn, jnp.dtype(fp8.E5M2): ml_dtypes.float8_e5m2}
TINY = np.float32(np.finfo(np.float32).tiny)


def np_quant(v, dtype=fp8.E4M3):
    """One tile/block -> (q as float64, scale_inv float32), like DeepSeek: s = amax / fp8_max."""
    fmax = float(ml_dtypes.finfo(NP_FP8[jnp.dtype(dtype)]).max)
    v = np.asarray(v, np.float32)
    s = np.maximum(np.max(np.abs(v)) * np.float32(1.0 / fmax), TINY).astype(np.float32)
    return (v / s).astype(NP_FP8[jnp.dtype(dtype)]).astype(np.float64), s


def np_quant_rows(a, t, dtype=fp8.E4M3):
    """a [P, C] in 1 x t tiles along C -> q [P, C] float64, scale_inv [P, ceil(C/t)]."""
    q, s = np.zeros(a.shape), np.zeros((a.shape[0], -(-a.shape[1] // t)), np.float32)
    for p in range(a.shape[0]):
        for j, c in enumerate(range(0, a.shape[1], t)):
            q[p, c : c + t], s[p, j] = np_quant(a[p, c : c + t], dtype)
    return q, s


def np_quant_blocks(w, t):
    """w [R, C] in t x t blocks -> q [R, C] float64, scale_inv [ceil(R/t), ceil(C/t)]."""
    q = np.zeros(w.shape)
    s = np.zeros((-(-w.shape[0] // t), -(-w.shape[1] // t)), np.float32)
    for i, r in enumerate(range(0, w.shape[0], t)):
        for j, c in enumerate(range(0, w.shape[1], t)):
            q[r : r + t, c : c + t], s[i, j] = np_quant(w[r : r + t, c : c + t])
    return q, s


def np_sliced_gemm(a_q, a_s, b_q, b_s, t):
    """sum over slices s of (a_q[:, s] @ b_q[s, :]) * a_s[:, s, None] * b_s[s, :] in float64.

    a_q [P, C], a_s [P, S], b_q [C, Q], b_s [S, Q] (per-column scales of each slice).
    Returns (result, the same sum over absolute values) for the rounding bound.
    """
    out, out_abs = np.zeros((a_q.shape[0], b_q.shape[1])), np.zeros((a_q.shape[0], b_q.shape[1]))
    for j, c in enumerate(range(0, a_q.shape[1], t)):
        scale = a_s[:, j, None].astype(np.float64) * b_s[j].astype(np.float64)
        out += (a_q[:, c : c + t] @ b_q[c : c + t]) * scale
        out_abs += (np.abs(a_q[:, c : c + t]) @ np.abs(b_q[c : c + t])) * np.abs(scale)
    return out, out_abs


def block_cols(w_s, t, length):
    """Per-block scales [S, Sq] -> per-column scales [S, length]."""
    return np.repeat(w_s, t, axis=1)[:, :length]


def ref_fprop(x, w, t):
    xq, xs = np_quant_rows(x, t)
    wq, ws = np_quant_blocks(w, t)
    return np_sliced_gemm(xq, xs, wq, block_cols(ws, t, w.shape[1]), t)


def ref_dgrad(dy, w, t, grad_dtype):
    dyq, dys = np_quant_rows(dy, t, grad_dtype)
    wq, ws = np_quant_blocks(w, t)
    return np_sliced_gemm(dyq, dys, wq.T, block_cols(ws.T, t, w.shape[0]), t)


def ref_wgrad(x, dy, t, grad_dtype):
    xq, xs = np_quant_rows(x, t)
    x_deq = (xq.astype(np.float32) * np.repeat(xs, t, axis=1)[:, : x.shape[1]]).astype(np.float32)
    xtq, xts = np_quant_rows(x_deq.T, t)  # 128 x 1 tiles of x along tokens
    dytq, dyts = np_quant_rows(dy.T, t, grad_dtype)
    return np_sliced_gemm(xtq, xts, dytq.T, dyts.T, t)


def assert_within_f32_rounding(got, ref_and_abs, contraction):
    ref, ref_abs = ref_and_abs
    err = np.abs(np.asarray(got, np.float64) - ref)
    bound = (contraction + 3) * 2.0**-24 * ref_abs + 1e-30
    assert np.all(err <= bound), f"max err / bound = {np.max(err / bound):.3g}"


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def gaussian(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
