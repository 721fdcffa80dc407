"""DeepSeek-V3's fine-grained FP8 GEMMs (report section 3.3) with a `custom_vjp`.

Letters: N tokens (all leading dims of x flattened), K input features, M output features,
S number of 128-wide slices of a GEMM's contraction dim. Quantisation lives in `fp8_quant`, the
routed experts' grouped GEMMs (the recipes' `grouped` and `routed_grouped`) in `fp8_grouped`.

The three GEMMs of a linear layer y = x @ w, each with FP8 operands:

  Fprop  y  [N, M] = x  [N, K] @ w  [K, M]   x: 1 x 128 tiles along K, w: 128 x 128 blocks
  Dgrad  dx [N, K] = dy [N, M] @ wᵀ [M, K]   dy: 1 x 128 tiles along M, w: the same blocks
  Wgrad  dw [K, M] = xᵀ [K, N] @ dy [N, M]   x, dy: 128 x 1 tiles along N (per column)

Each GEMM splits its contraction dim into 128-wide slices (the report's promotion interval),
runs one batched `lax.dot_general` on the FP8 operands with float32 results ([S, P, Q]
partial products), multiplies each slice by its two operands' float32 scales and sums the
slices in float32. The result is the exactly dequantised product up to float32 rounding.

On accelerators this form (float8 operands, `preferred_element_type=float32`) is what XLA
rewrites into native FP8 GEMMs (cuBLASLt on Hopper). It materialises [S, P, Q] partial
products, S times the output; DeepGEMM instead promotes partials inside the kernel.
`jax.nn.scaled_matmul(lhs [B, P, C], rhs [B, Q, C], lhs_scales [B, P, C/bs],
rhs_scales [B, Q, C/bs])` expresses the same per-slice scaling as one fused op (our 128 x 128
weight scales would be repeated per row of w), but in jax 0.10.2 it lowers only on CUDA/ROCm
through cuDNN (no CPU rule), and its documented fast path is Blackwell MXFP8 (E8M0 scales,
block 32), so we do not depend on it.

Residuals. The forward saves FP8 values plus float32 scales, never the float32 activation:
x as quantised for Fprop (1 x 128 tiles) and w's FP8 blocks. Wgrad needs x in 128 x 1 tiles,
so the backward dequantises the saved x, and re-quantises it along N — the report's own
workflow (section 3.5.2: "read out, dequantized, transposed, re-quantized into 128x1 tiles").
Numerical consequence: Wgrad sees x rounded twice (error per element up to ~2x a single
E4M3 rounding; on gaussian data dw is ~4.5% off the float32 product against ~3.7% for y and
dx). The alternative, a second 128 x 1 copy quantised from the original x in the forward,
rounds once but doubles the saved activation bytes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.ops.fp8_grouped import (
    fp8_ragged_dot,
    fp8_routed_ragged_dots,
    per_tensor_fp8_ragged_dot,
)
from deepseek_jax.ops.fp8_quant import (
    DEFAULT_TILE,
    E4M3,
    E5M2,
    dequantize_blockwise_2d,
    dequantize_tiles,
    expand_scales,
    fp8_max,
    quantize_blockwise_2d,
    quantize_per_tensor,
    quantize_tiles,
    scale_inv_from_amax,
)
from deepseek_jax.ops.recipe import Route

__all__ = [
    "E4M3",
    "E5M2",
    "Fp8Recipe",
    "PerTensorFp8Recipe",
    "dequantize_blockwise_2d",
    "dequantize_tiles",
    "fp8_matmul",
    "fp8_ragged_dot",
    "fp8_max",
    "per_tensor_fp8_matmul",
    "quantize_blockwise_2d",
    "quantize_per_tensor",
    "quantize_tiles",
    "scale_inv_from_amax",
    "sliced_fp8_dot",
]

Array = jax.Array
DType = Any


def sliced_fp8_dot(
    a_q: Array, a_scale_inv: Array, b_q: Array, b_scale_inv: Array, tile: int = DEFAULT_TILE
) -> Array:
    """FP8 GEMM with per-slice scales on the contraction dim C, float32 accumulation.

    Args:
      a_q: [P, C] FP8.
      a_scale_inv: [S, P] float32, scale of a[p, slice s], S = ceil(C / tile).
      b_q: [C, Q] FP8.
      b_scale_inv: [S, Q] float32, scale of b[slice s, q].
      tile: slice width.

    Returns:
      [P, Q] float32 = sum_s (a_q[:, s] @ b_q[s, :]) * a_scale_inv[s, :, None] * b_scale_inv[s].
    """
    (p, c), (c_b, q) = a_q.shape, b_q.shape
    if c != c_b:
        raise ValueError(f"Contraction dims differ: a {a_q.shape}, b {b_q.shape}.")
    slices = -(-c // tile)
    pad = slices * tile - c  # zero padding adds zero products
    a_psc = jnp.pad(a_q, ((0, 0), (0, pad))).reshape(p, slices, tile)
    b_scq = jnp.pad(b_q, ((0, pad), (0, 0))).reshape(slices, tile, q)
    partial_spq = jax.lax.dot_general(
        a_psc,
        b_scq,
        dimension_numbers=(((2,), (1,)), ((1,), (0,))),
        preferred_element_type=jnp.float32,
    )
    scaled = partial_spq * a_scale_inv[:, :, None] * b_scale_inv[:, None, :]
    return jnp.sum(scaled, axis=0)


def _fprop(x_nk, w_km, tile, dtype):
    x_q, x_sinv_ns = quantize_tiles(x_nk, tile, axis=1, dtype=dtype)
    w_q, w_sinv = quantize_blockwise_2d(w_km, tile, dtype=dtype)  # w_sinv [Sk, Sm]
    w_sinv_sm = expand_scales(w_sinv, tile, w_km.shape[1], axis=1)
    y = sliced_fp8_dot(x_q, x_sinv_ns.T, w_q, w_sinv_sm, tile)
    return y, (x_q, x_sinv_ns, w_q, w_sinv)


def _dgrad(dy_nm, w_q, w_sinv, tile, grad_dtype):
    dy_q, dy_sinv_ns = quantize_tiles(dy_nm, tile, axis=1, dtype=grad_dtype)
    wt_sinv_sk = expand_scales(w_sinv.T, tile, w_q.shape[0], axis=1)
    return sliced_fp8_dot(dy_q, dy_sinv_ns.T, w_q.T, wt_sinv_sk, tile)


def _wgrad(x_q, x_sinv_ns, dy_nm, tile, dtype, grad_dtype):
    x_nk = dequantize_tiles(x_q, x_sinv_ns, tile, axis=1)
    xc_q, xc_sinv_sk = quantize_tiles(x_nk, tile, axis=0, dtype=dtype)
    dyc_q, dyc_sinv_sm = quantize_tiles(dy_nm, tile, axis=0, dtype=grad_dtype)
    return sliced_fp8_dot(xc_q.T, xc_sinv_sk, dyc_q, dyc_sinv_sm, tile)


class _Static(NamedTuple):
    """Hashable non-differentiable arguments of the custom_vjp GEMMs."""

    tile: int
    dtype: jnp.dtype  # FP8 dtype of x and w
    grad_dtype: jnp.dtype  # FP8 dtype of dy
    x_dtype: jnp.dtype  # primal dtypes: y and dx come back in x's, dw in w's
    w_dtype: jnp.dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_matmul_2d(x_nk, w_km, st: _Static):
    return _fprop(x_nk, w_km, st.tile, st.dtype)[0].astype(st.x_dtype)


def _fp8_matmul_2d_fwd(x_nk, w_km, st: _Static):
    y, residuals = _fprop(x_nk, w_km, st.tile, st.dtype)
    return y.astype(st.x_dtype), residuals


def _fp8_matmul_2d_bwd(st: _Static, residuals, dy_nm):
    x_q, x_sinv_ns, w_q, w_sinv = residuals
    dx = _dgrad(dy_nm, w_q, w_sinv, st.tile, st.grad_dtype)
    dw = _wgrad(x_q, x_sinv_ns, dy_nm, st.tile, st.dtype, st.grad_dtype)
    return dx.astype(st.x_dtype), dw.astype(st.w_dtype)


_fp8_matmul_2d.defvjp(_fp8_matmul_2d_fwd, _fp8_matmul_2d_bwd)


def _check_matmul_shapes(x: Array, w: Array) -> None:
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8 matmul expects x [..., K] and w [K, M]; got {x.shape}, {w.shape}.")


def fp8_matmul(
    x: Array,
    w: Array,
    tile: int = DEFAULT_TILE,
    dtype: DType = E4M3,
    grad_dtype: DType = E4M3,
) -> Array:
    """y = x @ w with DeepSeek-V3's fine-grained FP8 Fprop, Dgrad and Wgrad (module docstring).

    Args:
      x: [..., K] activations; leading dims are flattened into N tokens.
      w: [K, M] weight.
      tile: tile / block edge (128 in DeepSeek-V3; small values for tests).
      dtype: FP8 dtype of x and w.
      grad_dtype: FP8 dtype of the output gradient dy (E4M3 in DeepSeek-V3; E5M2 for the
        hybrid-format baseline).

    Returns:
      [..., M] in x's dtype. Gradients come back in x's and w's dtypes.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    _check_matmul_shapes(x, w)
    st = _Static(tile, jnp.dtype(dtype), jnp.dtype(grad_dtype), x.dtype, w.dtype)
    y_nm = _fp8_matmul_2d(x.reshape(-1, x.shape[-1]), w, st)
    return y_nm.reshape(x.shape[:-1] + (w.shape[1],))


def _per_tensor_dot(a_q, a_sinv, b_q, b_sinv):
    """[P, C] @ [C, Q] FP8 with one scale per operand -> [P, Q] float32."""
    y = jax.lax.dot_general(a_q, b_q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y * (a_sinv * b_sinv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _per_tensor_matmul_2d(x_nk, w_km, st: _Static):
    return _per_tensor_matmul_2d_fwd(x_nk, w_km, st)[0]


def _per_tensor_matmul_2d_fwd(x_nk, w_km, st: _Static):
    x_q, x_sinv = quantize_per_tensor(x_nk, st.dtype)
    w_q, w_sinv = quantize_per_tensor(w_km, st.dtype)
    y = _per_tensor_dot(x_q, x_sinv, w_q, w_sinv).astype(st.x_dtype)
    return y, (x_q, x_sinv, w_q, w_sinv)


def _per_tensor_matmul_2d_bwd(st: _Static, residuals, dy_nm):
    # One scale per tensor is transpose-invariant, so Wgrad reuses the saved FP8 x as is.
    x_q, x_sinv, w_q, w_sinv = residuals
    dy_q, dy_sinv = quantize_per_tensor(dy_nm, st.grad_dtype)
    dx = _per_tensor_dot(dy_q, dy_sinv, w_q.T, w_sinv)
    dw = _per_tensor_dot(x_q.T, x_sinv, dy_q, dy_sinv)
    return dx.astype(st.x_dtype), dw.astype(st.w_dtype)


_per_tensor_matmul_2d.defvjp(_per_tensor_matmul_2d_fwd, _per_tensor_matmul_2d_bwd)


def per_tensor_fp8_matmul(
    x: Array, w: Array, dtype: DType = E4M3, grad_dtype: DType = E4M3
) -> Array:
    """y = x @ w with per-tensor current scaling for x, w and dy: [..., K] @ [K, M] -> [..., M]."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    _check_matmul_shapes(x, w)
    st = _Static(0, jnp.dtype(dtype), jnp.dtype(grad_dtype), x.dtype, w.dtype)
    y_nm = _per_tensor_matmul_2d(x.reshape(-1, x.shape[-1]), w, st)
    return y_nm.reshape(x.shape[:-1] + (w.shape[1],))


def _as_fp8_dtype(dtype: DType, field: str) -> jnp.dtype:
    dt = jnp.dtype(dtype)
    if dt not in (jnp.dtype(E4M3), jnp.dtype(E5M2)):
        raise ValueError(f"{field}={dtype!r} is not supported; use float8_e4m3fn or float8_e5m2.")
    return dt


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
    """DeepSeek-V3 fine-grained FP8 (an ops.recipe.Recipe): `matmul(x, w)` replaces `x @ w` in a `Linear`,
    `grouped` / `routed_grouped` the routed experts' grouped GEMMs.

    Attributes:
      tile: activation tile length and weight block edge (1 x tile, tile x tile).
      fp8_dtype: storage dtype of activations and weights (E4M3 throughout in DeepSeek-V3).
      grad_fp8_dtype: storage dtype of output gradients (E5M2 gives the hybrid-format baseline).
    """

    tile: int = DEFAULT_TILE
    fp8_dtype: DType = E4M3
    grad_fp8_dtype: DType = E4M3

    def __post_init__(self):
        if not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"Fp8Recipe.tile must be a positive int, got {self.tile!r}.")
        object.__setattr__(self, "fp8_dtype", _as_fp8_dtype(self.fp8_dtype, "fp8_dtype"))
        object.__setattr__(
            self, "grad_fp8_dtype", _as_fp8_dtype(self.grad_fp8_dtype, "grad_fp8_dtype")
        )

    def matmul(self, x: Array, w: Array) -> Array:
        """x [..., K] @ w [K, M] -> [..., M] in x's dtype, FP8 in forward and backward."""
        return fp8_matmul(x, w, self.tile, self.fp8_dtype, self.grad_fp8_dtype)

    def grouped(self, x: Array, w: Array, group_sizes: Array) -> Array:
        """`lax.ragged_dot(x [M, K], w [G, K, N], group_sizes [G])` -> [M, N] in FP8 (fp8_grouped)."""
        return fp8_ragged_dot(x, w, group_sizes, self.tile, self.fp8_dtype, self.grad_fp8_dtype)

    def routed_grouped(self, x: Array, ws: tuple[Array, ...], group_sizes: Array, route: Route,
                       route_args: tuple[Array, ...]) -> tuple[Array, ...]:
        """route(x [n, K]) @ w_g for each w [G, K, N_i] -> [M, N_i], x quantised before the route, which
        then moves FP8 rows and their 1 x tile scales (the report's FP8 dispatch)."""
        return fp8_routed_ragged_dots(x, ws, group_sizes, route, route_args, self.tile, self.fp8_dtype,
                                      self.grad_fp8_dtype)


@dataclasses.dataclass(frozen=True)
class PerTensorFp8Recipe:
    """Baseline: one current (online) scale per tensor for x, w and dy (an ops.recipe.Recipe too)."""

    fp8_dtype: DType = E4M3
    grad_fp8_dtype: DType = E4M3

    def __post_init__(self):
        object.__setattr__(self, "fp8_dtype", _as_fp8_dtype(self.fp8_dtype, "fp8_dtype"))
        object.__setattr__(
            self, "grad_fp8_dtype", _as_fp8_dtype(self.grad_fp8_dtype, "grad_fp8_dtype")
        )

    def matmul(self, x: Array, w: Array) -> Array:
        """x [..., K] @ w [K, M] -> [..., M] in x's dtype, per-tensor FP8."""
        return per_tensor_fp8_matmul(x, w, self.fp8_dtype, self.grad_fp8_dtype)

    def grouped(self, x: Array, w: Array, group_sizes: Array) -> Array:
        """`lax.ragged_dot(x [M, K], w [G, K, N], group_sizes [G])` -> [M, N], per-tensor FP8 (one scale
        for x, one per expert's weight, one for dy)."""
        return per_tensor_fp8_ragged_dot(x, w, group_sizes, self.fp8_dtype, self.grad_fp8_dtype)

    def routed_grouped(self, x: Array, ws: tuple[Array, ...], group_sizes: Array, route: Route,
                       route_args: tuple[Array, ...]) -> tuple[Array, ...]:
        """route(x) @ w_g for each w. The rows move in x's dtype: a per-tensor scale belongs to the rows
        one GEMM sees (with expert parallelism, those a device receives), not to a sender's tokens."""
        x_m = route(x, *route_args)
        return tuple(self.grouped(x_m, w, group_sizes) for w in ws)


RECIPES = ("fine_grained", "per_tensor")


def make_recipe(name: str, *, tile: int = DEFAULT_TILE, grad_dtype: DType = E4M3
                ) -> Fp8Recipe | PerTensorFp8Recipe:
    """The recipe a run config names (`config.fp8.recipe`)."""
    if name == "fine_grained":
        return Fp8Recipe(tile=tile, grad_fp8_dtype=grad_dtype)
    if name == "per_tensor":
        return PerTensorFp8Recipe(grad_fp8_dtype=grad_dtype)
    raise ValueError(f"config.fp8.recipe={name!r} is not a recipe; use one of {RECIPES}.")
