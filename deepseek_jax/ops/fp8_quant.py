"""Fine-grained FP8 quantisation (DeepSeek-V3 report, section 3.3.2), as pure JAX functions.

Every group of values (a 1-D *tile* or a 2-D *block*) gets its own scale, computed online from
the group's current max-abs; there is no amax history and no delayed scaling.

Scale direction. We store ``scale_inv``, the *dequantisation multiplier* (DeepSeek's and
Hugging Face's ``weight_scale_inv``)::

    scale_inv = max(amax * (1 / fp8_max), FLOAT32_TINY)      # float32, one per tile/block
    q         = fp8(x / scale_inv)                           # |x / scale_inv| <= fp8_max
    x        ~= q * scale_inv                                # dequantise

``fp8_max`` is 448 for E4M3 (``jnp.float8_e4m3fn``) and 57344 for E5M2. The reciprocal is
spelled out because XLA rewrites a division by a constant into that multiplication anyway;
writing it ourselves makes the scale bit-identical across backends and NumPy references.

Edge cases:
  * Lengths that are not multiples of the tile size give partial edge tiles. Internally the
    edge is zero-padded, which cannot change a max-abs, and the padding is sliced away.
  * An all-zero tile gets ``scale_inv = FLOAT32_TINY`` (not 0), so ``q = 0`` and no NaN.
  * Inf/NaN propagate visibly: a tile holding inf gets ``scale_inv = inf`` and one holding NaN
    gets ``scale_inv = NaN`` (``jnp.max``/``jnp.maximum`` propagate NaN), so the whole tile
    dequantises to NaN. (E4M3FN has no inf: a lone inf could not survive a cast anyway.)

Error bound (E4M3: 3 mantissa bits, normals down to 2**-6, subnormal step 2**-9). With
``v = x / scale_inv`` and ``|v| <= 448``, rounding to nearest gives
``|v - fp8(v)| <= max(|v| * 2**-4, 2**-10)``, hence per element
``|x - deq(q(x))| <= max(|x| * 2**-4, scale_inv * 2**-10)`` (plus float32 rounding), and per
tile ``<= 16 * scale_inv = amax / 28`` (the top binade [256, 448] has spacing 32).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
DType = Any

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
FLOAT32_TINY = float(jnp.finfo(jnp.float32).tiny)
DEFAULT_TILE = 128


def fp8_max(dtype: DType) -> float:
    """Largest finite value of an FP8 dtype (448 for E4M3FN, 57344 for E5M2)."""
    return float(jnp.finfo(dtype).max)


def num_tiles(length: int, tile: int) -> int:
    """Number of (possibly partial) tiles covering `length`: ceil(length / tile)."""
    return -(-length // tile)


def scale_inv_from_amax(amax: Array, dtype: DType = E4M3) -> Array:
    """amax (float32, any shape) -> scale_inv of the same shape; see the module docstring."""
    amax = amax.astype(jnp.float32)
    return jnp.maximum(amax * jnp.float32(1.0 / fp8_max(dtype)), jnp.float32(FLOAT32_TINY))


def _pad_to_multiple(x: Array, tile: int, axis: int) -> Array:
    pad = num_tiles(x.shape[axis], tile) * tile - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _split_axis(x: Array, tile: int, axis: int) -> Array:
    """[..., L, ...] -> [..., S, tile, ...] with S = ceil(L / tile), zero-padding the edge."""
    x = _pad_to_multiple(x, tile, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] // tile, tile) + x.shape[axis + 1 :])


def expand_scales(scale_inv: Array, tile: int, length: int, axis: int) -> Array:
    """Repeat per-tile scales along `axis` to per-element: [.., S, ..] -> [.., length, ..]."""
    return jax.lax.slice_in_dim(jnp.repeat(scale_inv, tile, axis=axis), 0, length, axis=axis)


def quantize_tiles(
    x: Array, tile: int = DEFAULT_TILE, axis: int = -1, dtype: DType = E4M3
) -> tuple[Array, Array]:
    """Quantise with 1-D tiles of `tile` consecutive elements along `axis` (one scale each).

    `axis=-1` on activations [N, K] gives DeepSeek's 1 x 128 tiles; `axis=0` gives the 128 x 1
    tiles used for the Wgrad GEMM, which contracts over tokens.

    Args:
      x: [..., L, ...] any float dtype.
      tile: tile length along `axis`; the last tile may be partial.
      axis: the tiled axis.
      dtype: FP8 storage dtype.

    Returns:
      q: same shape as x, `dtype`.
      scale_inv: x's shape with `axis` replaced by ceil(L / tile), float32; x ~= q * scale_inv.
    """
    axis = axis % x.ndim
    length = x.shape[axis]
    tiles = _split_axis(x.astype(jnp.float32), tile, axis)
    amax = jnp.max(jnp.abs(tiles), axis=axis + 1, keepdims=True)
    scale_inv = scale_inv_from_amax(amax, dtype)
    q = (tiles / scale_inv).astype(dtype)
    q = q.reshape(q.shape[:axis] + (-1,) + q.shape[axis + 2 :])
    return jax.lax.slice_in_dim(q, 0, length, axis=axis), jnp.squeeze(scale_inv, axis + 1)


def dequantize_tiles(
    q: Array,
    scale_inv: Array,
    tile: int = DEFAULT_TILE,
    axis: int = -1,
    out_dtype: DType = jnp.float32,
) -> Array:
    """Inverse of `quantize_tiles`: q [..., L, ...], scale_inv [..., S, ...] -> [..., L, ...]."""
    axis = axis % q.ndim
    scales = expand_scales(scale_inv, tile, q.shape[axis], axis)
    return (q.astype(jnp.float32) * scales).astype(out_dtype)


def _check_block_grid(shape: tuple[int, ...], grid: tuple[int, ...], block: int) -> None:
    if len(shape) != 2:
        raise ValueError(f"Expected a 2-D quantised weight, got shape {tuple(shape)}.")
    expected = (num_tiles(shape[0], block), num_tiles(shape[1], block))
    if tuple(grid) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(grid)} but a weight of shape {tuple(shape)} with "
            f"{block}x{block} blocks needs {expected}: check the block size and that the scale "
            "belongs to this weight."
        )


def quantize_blockwise_2d(
    w: Array, block: int = DEFAULT_TILE, dtype: DType = E4M3
) -> tuple[Array, Array]:
    """Quantise a 2-D weight in block x block blocks (DeepSeek checkpoint format).

    Layout-agnostic: a torch-layout weight [out, in] gives a grid [ceil(out/128), ceil(in/128)]
    (e.g. [576, 7168] -> [5, 56]); a JAX kernel [in, out] gives the transposed grid.

    Args:
      w: [R, C] any float dtype.
      block: block edge; edge blocks may be partial.
      dtype: FP8 storage dtype.

    Returns:
      q: [R, C] `dtype`.
      weight_scale_inv: [ceil(R/block), ceil(C/block)] float32, w ~= q * scale_inv per block.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_blockwise_2d expects a 2-D weight, got shape {w.shape}.")
    rows, cols = w.shape
    blocks = _split_axis(_split_axis(w.astype(jnp.float32), block, 1), block, 0)  # [Sr, b, Sc, b]
    amax = jnp.max(jnp.abs(blocks), axis=(1, 3), keepdims=True)
    scale_inv = scale_inv_from_amax(amax, dtype)
    q = (blocks / scale_inv).astype(dtype)
    q = q.reshape(blocks.shape[0] * block, blocks.shape[2] * block)[:rows, :cols]
    return q, scale_inv[:, 0, :, 0]


def dequantize_blockwise_2d(
    q: Array, weight_scale_inv: Array, block: int = DEFAULT_TILE, out_dtype: DType = jnp.float32
) -> Array:
    """Inverse of `quantize_blockwise_2d`: q [R, C], scale_inv [ceil(R/b), ceil(C/b)] -> [R, C].

    Raises:
      ValueError: if the scale grid does not match q's shape and the block size.
    """
    _check_block_grid(q.shape, weight_scale_inv.shape, block)
    scales = expand_scales(weight_scale_inv.astype(jnp.float32), block, q.shape[0], 0)
    scales = expand_scales(scales, block, q.shape[1], 1)
    return (jnp.asarray(q).astype(jnp.float32) * scales).astype(out_dtype)


def quantize_per_tensor(x: Array, dtype: DType = E4M3) -> tuple[Array, Array]:
    """Per-tensor current scaling (the coarse baseline): x [...] -> (q [...], scale_inv [])."""
    x = x.astype(jnp.float32)
    scale_inv = scale_inv_from_amax(jnp.max(jnp.abs(x)), dtype)
    return (x / scale_inv).astype(dtype), scale_inv
