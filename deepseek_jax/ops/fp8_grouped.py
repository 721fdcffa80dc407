"""FP8 grouped GEMMs for the routed experts (DeepSeek-V3 report, section 3.3), with a `custom_vjp`.

Letters: M rows, K contraction features, N output features, G groups (experts), t the tile edge (128),
S = ceil(K / t) slices of K, J token tiles. The rows are sorted by group: group g owns the contiguous
rows [o_g, o_g + m_g) with m_g = group_sizes[g], and rows past sum(m_g) belong to no group (their
output and gradient are zero; expert parallelism puts its empty slots there).

The three GEMMs of y_g = x_g @ w_g, each on FP8 operands with float32 accumulation:

  Fprop  y  [M, N]    = x_g  @ w_g    x: 1 x t tiles along K, w_g: t x t blocks (per expert)
  Dgrad  dx [M, K]    = dy_g @ w_gᵀ   dy: 1 x t tiles along N, w_g: the same blocks
  Wgrad  dw [G, K, N] = x_gᵀ @ dy_g   x, dy: t x 1 tiles along each group's own rows

Fprop and Dgrad use `lax.ragged_dot_general` with the slices of the contraction dim as a batch dim:
one grouped GEMM gives the [S, M, N] per-slice partial products in float32, each slice is multiplied
by the row's tile scale and the row's expert's block scale and the slices are summed in float32,
the promotion scheme of `fp8.sliced_fp8_dot`.

Wgrad tiles. The t x 1 tiles of the token axis are laid out per group: group g's rows fill
ceil(m_g / t) tiles of its own, the last one partial, so no tile straddles two experts (the report
quantises per expert's token block; DeepGEMM's grouped layouts likewise align every expert to the
block size). We scatter the rows into that padded layout (J = M // t + G tile slots bound the tiles
of any split of M rows into G groups), quantise with the ordinary t x 1 tiles, run one batched
`dot_general` over the J tiles ([J, K, N] float32 partials), scale each tile and sum the tiles of a
group. `ragged_dot_general` can contract a ragged token axis (each tile a group), but on CPU jax lowers
it to a dense GEMM per group (masking the other groups' rows): J times the work, 35x slower measured
for M=4096, K=256, N=128, where the padded batch costs (M + G t) / M. (Fprop and Dgrad pay the same
G-fold CPU expansion as the high-precision `lax.ragged_dot`; accelerators run them as grouped GEMMs.)

Residuals, as in `fp8.py`: the FP8 x (1 x t tiles) and its scales, each expert's FP8 blocks and their
scales, never a float32 activation. Wgrad dequantises the saved x and re-quantises it in t x 1 tiles
(two roundings of x, the report's own workflow).

`fp8_routed_ragged_dots` is the dispatch form: it quantises the tokens x [n, K] once, moves the FP8
rows and their scales with `route` (a gather, or expert parallelism's all-to-all) and feeds them to
several grouped GEMMs (the experts' gate and up projections). Row-wise tiles commute with moving
rows, so this equals `fp8_ragged_dot(route(x), w)` exactly; the backward sends dx through route's
transpose in x's dtype.

`per_tensor_fp8_ragged_dot` is the coarse baseline: one current scale for x, one per expert's weight
and one for dy; its Wgrad is one `ragged_dot_general` contracting the ragged token axis per expert.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.ops.fp8_quant import (
    DEFAULT_TILE,
    E4M3,
    dequantize_tiles,
    expand_scales,
    num_tiles,
    quantize_blockwise_2d,
    quantize_per_tensor,
    quantize_tiles,
)
from deepseek_jax.ops.recipe import Route

Array = jax.Array
DType = Any

# ragged_dot_general layouts. Fprop/Dgrad: lhs [S, M, t] (ragged M), rhs [G, S, t, N] -> [S, M, N].
_SLICED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((2,), (2,)), ((0,), (1,))), lhs_ragged_dimensions=[1], rhs_group_dimensions=[0])
# Per-tensor Wgrad: lhs [M, K], rhs [M, N], ragged contraction over M -> [G, K, N].
_RAGGED_CONTRACTION = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def _bucket(ends: Array, length: int) -> Array:
    """For i in range(length), how many of the sorted `ends` are <= i: [length] int32."""
    # Not jnp.searchsorted: in jax 0.10.2 it fails on values varying over shard_map axes.
    return jnp.sum(jnp.arange(length)[:, None] >= ends[None, :], axis=1, dtype=jnp.int32)


def row_groups(group_sizes: Array, rows: int) -> Array:
    """Group of each row: [rows] int32, G for rows past the last group."""
    return _bucket(jnp.cumsum(group_sizes), rows)


def quantize_experts(w: Array, tile: int = DEFAULT_TILE, dtype: DType = E4M3) -> tuple[Array, Array]:
    """Each expert's weight in tile x tile blocks: w [G, R, C] -> (q [G, R, C], scale_inv [G, Sr, Sc])."""
    return jax.vmap(functools.partial(quantize_blockwise_2d, block=tile, dtype=dtype))(w)


def grouped_sliced_dot(a_q: Array, a_scale_inv: Array, b_q: Array, b_scale_inv: Array, group_sizes: Array,
                       tile: int = DEFAULT_TILE) -> Array:
    """Grouped FP8 GEMM, per-slice scales on the contraction dim C, float32 accumulation.

    Args:
      a_q: [P, C] FP8 rows sorted by group.
      a_scale_inv: [P, S] float32, scale of a[p, slice s], S = ceil(C / tile).
      b_q: [G, C, Q] FP8.
      b_scale_inv: [G, S, ceil(Q / tile)] float32 block scales of each b_g.
      group_sizes: [G] int32, sum <= P.
      tile: slice width and block edge.

    Returns:
      [P, Q] float32: row p of group g is sum_s (a_q[p, s] @ b_q[g, s]) * a_scale_inv[p, s] *
      b_scale_inv[g, s, q // tile]; rows in no group are zero.
    """
    (p, c), (g, _, q) = a_q.shape, b_q.shape
    slices = num_tiles(c, tile)
    pad = slices * tile - c  # Zero padding adds zero products.
    a_spt = jnp.pad(a_q, ((0, 0), (0, pad))).reshape(p, slices, tile).transpose(1, 0, 2)
    b_gstq = jnp.pad(b_q, ((0, 0), (0, pad), (0, 0))).reshape(g, slices, tile, q)
    partial_spq = jax.lax.ragged_dot_general(a_spt, b_gstq, group_sizes, _SLICED,
                                             preferred_element_type=jnp.float32)
    group = jnp.minimum(row_groups(group_sizes, p), g - 1)  # Rows in no group have zero partials.
    b_scale_spq = expand_scales(b_scale_inv[group].transpose(1, 0, 2), tile, q, axis=2)
    return jnp.sum(partial_spq * a_scale_inv.T[:, :, None] * b_scale_spq, axis=0)


def _dgrad(dy_mn, w_q, w_sinv, group_sizes, tile, grad_dtype):
    dy_q, dy_sinv = quantize_tiles(dy_mn, tile, axis=1, dtype=grad_dtype)
    return grouped_sliced_dot(dy_q, dy_sinv, w_q.transpose(0, 2, 1), w_sinv.transpose(0, 2, 1),
                              group_sizes, tile)


def token_tiles(group_sizes: Array, rows: int, tile: int) -> tuple[Array, Array, int]:
    """The per-group layout of the Wgrad token tiles (module docstring).

    Returns:
      position: [rows] int32, each row's place in the padded [J * tile] layout (J * tile, out of
        bounds, for rows in no group).
      tile_group: [J] int32, the group of each tile slot (G for unused slots).
      J: the static number of tile slots, min(rows // tile + G, rows).
    """
    g = group_sizes.shape[0]
    slots = max(min(rows // tile + g, rows), 1)
    ends = jnp.cumsum(group_sizes)
    tiles = -(-group_sizes // tile)
    tile_ends = jnp.cumsum(tiles)
    group = row_groups(group_sizes, rows)
    safe = jnp.minimum(group, g - 1)
    offset = jnp.arange(rows) - (ends - group_sizes)[safe]
    position = jnp.where(group < g, (tile_ends - tiles)[safe] * tile + offset, slots * tile)
    tile_group = _bucket(tile_ends, slots)
    return position.astype(jnp.int32), tile_group, slots


def _wgrad(x_q, x_sinv, dy_mn, group_sizes, tile, dtype, grad_dtype):
    rows, g = x_q.shape[0], group_sizes.shape[0]
    position, tile_group, slots = token_tiles(group_sizes, rows, tile)

    def tiled(a_mc, fp8):  # [M, C] -> per-group t x 1 tiles: q [J, t, C], scale_inv [J, C]
        padded = jnp.zeros((slots * tile, a_mc.shape[1]), jnp.float32)
        padded = padded.at[position].set(a_mc.astype(jnp.float32), mode="drop")
        q, sinv = quantize_tiles(padded, tile, axis=0, dtype=fp8)
        return q.reshape(slots, tile, -1), sinv

    xt_q, xt_sinv = tiled(dequantize_tiles(x_q, x_sinv, tile, axis=1), dtype)
    dyt_q, dyt_sinv = tiled(dy_mn, grad_dtype)
    partial_jkn = jax.lax.dot_general(xt_q, dyt_q, (((1,), (1,)), ((0,), (0,))),
                                      preferred_element_type=jnp.float32)
    scaled = partial_jkn * xt_sinv[:, :, None] * dyt_sinv[:, None, :]
    return jax.ops.segment_sum(scaled, tile_group, num_segments=g)


class _Static(NamedTuple):
    """Hashable non-differentiable arguments of the grouped GEMMs."""

    tile: int
    dtype: jnp.dtype  # FP8 dtype of x and w
    grad_dtype: jnp.dtype  # FP8 dtype of dy
    x_shape: tuple[int, ...]  # x before the route: dx comes back in its shape and dtype
    x_dtype: jnp.dtype
    x_axes: tuple[str, ...]  # shard_map axes x varies over (empty outside shard_map)
    w_dtypes: tuple[jnp.dtype, ...]
    route: Route | None  # None: the identity


def _route(st: _Static, a, route_args):
    return a if st.route is None else st.route(a, *route_args)


def _route_transpose(st: _Static, d_mc, route_args):
    """dx [n, K] from the routed rows' gradient [M, K] (x's dtype: the backward moves no FP8)."""
    d_mc = d_mc.astype(st.x_dtype)
    if st.route is None:
        return d_mc
    x_like = jax.lax.pcast(jnp.zeros(st.x_shape, st.x_dtype), st.x_axes, to="varying")
    _, pullback = jax.vjp(lambda a: st.route(a, *route_args), x_like)
    return pullback(d_mc)[0]


def _routed_fwd(x, ws, group_sizes, route_args, st: _Static):
    x_q, x_sinv = quantize_tiles(x, st.tile, axis=1, dtype=st.dtype)
    x_q, x_sinv = _route(st, x_q, route_args), _route(st, x_sinv, route_args)
    ys, w_residuals = [], []
    for w in ws:
        w_q, w_sinv = quantize_experts(w, st.tile, st.dtype)
        ys.append(grouped_sliced_dot(x_q, x_sinv, w_q, w_sinv, group_sizes, st.tile).astype(st.x_dtype))
        w_residuals.append((w_q, w_sinv))
    return tuple(ys), (x_q, x_sinv, tuple(w_residuals), group_sizes, route_args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fp8_grouped_gemms(x, ws, group_sizes, route_args, st: _Static):
    return _routed_fwd(x, ws, group_sizes, route_args, st)[0]


def _routed_bwd(st: _Static, residuals, dys):
    x_q, x_sinv, w_residuals, group_sizes, route_args = residuals
    dx, dws = 0.0, []
    for (w_q, w_sinv), dy, w_dtype in zip(w_residuals, dys, st.w_dtypes):
        dx = dx + _dgrad(dy, w_q, w_sinv, group_sizes, st.tile, st.grad_dtype)
        dws.append(_wgrad(x_q, x_sinv, dy, group_sizes, st.tile, st.dtype, st.grad_dtype).astype(w_dtype))
    return _route_transpose(st, dx, route_args), tuple(dws), None, None


_fp8_grouped_gemms.defvjp(_routed_fwd, _routed_bwd)


def _check(x: Array, ws: Sequence[Array], group_sizes: Array) -> None:
    for w in ws:
        if x.ndim != 2 or w.ndim != 3 or w.shape[1] != x.shape[1] or group_sizes.shape != (w.shape[0],):
            raise ValueError(f"grouped FP8 GEMM expects x [M, K], w [G, K, N], group_sizes [G]; got "
                             f"{x.shape}, {w.shape}, {group_sizes.shape}.")


def _axes(a: Array) -> tuple[str, ...]:
    """The `shard_map` axes `a` varies over (empty outside shard_map)."""
    return tuple(sorted(jax.typeof(a).manual_axis_type.varying))


def _varying_like(arrays: Sequence[Array]) -> list[Array]:
    """Inside `shard_map`, marks every array varying over the union of their manual axes (no-op outside).

    The custom_vjp must return each weight's gradient with the weight's own axes: a weight replicated
    over 'data' whose dw varies over it needs a psum, which the transpose of this cast supplies."""
    axes = set().union(*(_axes(a) for a in arrays))
    return [jax.lax.pcast(a, tuple(sorted(axes - set(_axes(a)))), to="varying") for a in arrays]


def fp8_routed_ragged_dots(x: Array, ws: Sequence[Array], group_sizes: Array, route: Route | None = None,
                           route_args: tuple[Array, ...] = (), tile: int = DEFAULT_TILE,
                           fp8_dtype: DType = E4M3, grad_dtype: DType = E4M3) -> tuple[Array, ...]:
    """route(x) @ w_g for each w, the rows quantised once, before the route (module docstring).

    Args:
      x: [n, K] tokens in the compute dtype.
      ws: weights [G, K, N_i].
      group_sizes: [G] int32 rows per group of the routed rows, sum <= M.
      route: route(a [n, C], *route_args) -> [M, C], moving whole rows (a gather, an all-to-all; linear,
        dtype-agnostic: it moves FP8 values and float32 scales forward, x's dtype backward). None:
        the identity.
      route_args: arrays route needs (indices); not differentiated.
      tile: tile / block edge.
      fp8_dtype: FP8 dtype of x and w; grad_dtype: of the output gradients.

    Returns:
      One [M, N_i] per w, in x's dtype. Gradients: dx [n, K] in x's dtype, dw_i in w_i's.
    """
    x, ws, group_sizes = jnp.asarray(x), tuple(jnp.asarray(w) for w in ws), jnp.asarray(group_sizes)
    if x.ndim != 2 or not all(w.ndim == 3 and w.shape[1] == x.shape[1] for w in ws):
        raise ValueError(f"routed FP8 GEMMs expect x [n, K] and ws [G, K, N]; got {x.shape}, "
                         f"{[w.shape for w in ws]}.")
    x, *ws = _varying_like([x, *ws])
    st = _Static(tile, jnp.dtype(fp8_dtype), jnp.dtype(grad_dtype), x.shape, x.dtype, _axes(x),
                 tuple(w.dtype for w in ws), route)
    return _fp8_grouped_gemms(x, tuple(ws), group_sizes.astype(jnp.int32), tuple(route_args), st)


def fp8_ragged_dot(x: Array, w: Array, group_sizes: Array, tile: int = DEFAULT_TILE,
                   fp8_dtype: DType = E4M3, grad_dtype: DType = E4M3) -> Array:
    """`lax.ragged_dot(x, w, group_sizes)` with fine-grained FP8 Fprop, Dgrad and Wgrad.

    Args:
      x: [M, K] rows sorted by group.
      w: [G, K, N].
      group_sizes: [G] int32, sum <= M (rows past the sum give zeros).
      tile, fp8_dtype, grad_dtype: as `fp8.fp8_matmul`.

    Returns:
      [M, N] in x's dtype. Gradients come back in x's and w's dtypes.
    """
    x, w, group_sizes = jnp.asarray(x), jnp.asarray(w), jnp.asarray(group_sizes)
    _check(x, (w,), group_sizes)
    return fp8_routed_ragged_dots(x, (w,), group_sizes, None, (), tile, fp8_dtype, grad_dtype)[0]


# ---------------------------------------------------------------- per-tensor baseline


def _per_tensor_fwd(x, w, group_sizes, st: _Static):
    x_q, x_sinv = quantize_per_tensor(x, st.dtype)
    w_q, w_sinv = jax.vmap(functools.partial(quantize_per_tensor, dtype=st.dtype))(w)  # w_sinv [G]
    row_w_sinv = w_sinv[jnp.minimum(row_groups(group_sizes, x.shape[0]), w.shape[0] - 1)]
    y = jax.lax.ragged_dot(x_q, w_q, group_sizes, preferred_element_type=jnp.float32)
    y = y * (x_sinv * row_w_sinv)[:, None]
    return y.astype(st.x_dtype), (x_q, x_sinv, w_q, row_w_sinv, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _per_tensor(x, w, group_sizes, st: _Static):
    return _per_tensor_fwd(x, w, group_sizes, st)[0]


def _per_tensor_bwd(st: _Static, residuals, dy):
    # One scale per tensor is transpose-invariant: Wgrad reuses the saved FP8 x.
    x_q, x_sinv, w_q, row_w_sinv, group_sizes = residuals
    dy_q, dy_sinv = quantize_per_tensor(dy, st.grad_dtype)
    dx = jax.lax.ragged_dot(dy_q, w_q.transpose(0, 2, 1), group_sizes, preferred_element_type=jnp.float32)
    dx = dx * (dy_sinv * row_w_sinv)[:, None]
    dw = jax.lax.ragged_dot_general(x_q, dy_q, group_sizes, _RAGGED_CONTRACTION,
                                    preferred_element_type=jnp.float32)
    dw = dw * (x_sinv * dy_sinv)
    return dx.astype(st.x_dtype), dw.astype(st.w_dtypes[0]), None


_per_tensor.defvjp(_per_tensor_fwd, _per_tensor_bwd)


def per_tensor_fp8_ragged_dot(x: Array, w: Array, group_sizes: Array, fp8_dtype: DType = E4M3,
                              grad_dtype: DType = E4M3) -> Array:
    """`lax.ragged_dot` in FP8 with one current scale for x, one per expert weight and one for dy.

    x [M, K], w [G, K, N], group_sizes [G] -> [M, N] in x's dtype.
    """
    x, w, group_sizes = jnp.asarray(x), jnp.asarray(w), jnp.asarray(group_sizes)
    _check(x, (w,), group_sizes)
    x, w = _varying_like([x, w])
    st = _Static(0, jnp.dtype(fp8_dtype), jnp.dtype(grad_dtype), x.shape, x.dtype, _axes(x), (w.dtype,),
                 None)
    return _per_tensor(x, w, group_sizes.astype(jnp.int32), st)
