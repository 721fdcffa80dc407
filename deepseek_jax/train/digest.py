"""Digests of the arrays a checkpoint holds, computed from the arrays themselves (train/checkpoint.py).

    digests = tree_digests(tree)          # {'.params.embed_tokens.embedding': '5f0c...', ...}
    mismatched(tree, digests)             # paths whose arrays no longer match

A leaf's digest is two 32-bit sums over its elements' bit patterns: element i (row-major position) adds
(bits_i XOR mask(i)) * odd(i) mod 2^32, with two different position hashes for the two sums. It runs on
the device where the leaf lives, under jit, without gathering it: integer addition mod 2^32 does not
depend on the order of the terms, so a sharded array has the same digest on any mesh and any number of
processes, and a checkpoint restored onto another layout still verifies. Changing any one element
changes both sums (an odd factor is invertible mod 2^32, and XOR with the same mask keeps two different
bit patterns different); moving elements changes them through the position hashes; any other damage
passes both sums with a probability near 2^-64. Bit patterns, not values: -0.0 and every NaN payload
count as written.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_U32 = jnp.uint32


def _bit_patterns(a: jax.Array) -> jax.Array:
    """The elements' bit patterns as uint32, in `a`'s shape (8-byte elements: two words, a trailing axis)."""
    if jnp.issubdtype(a.dtype, jax.dtypes.extended):  # PRNG keys
        a = jax.random.key_data(a)
    if a.dtype == jnp.bool_:
        return a.astype(_U32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: _U32, 8: _U32}[a.dtype.itemsize]
    return lax.bitcast_convert_type(a, unsigned).astype(_U32)


def _leaf_digest(a: jax.Array) -> jax.Array:
    """uint32 [2]: the two position-weighted sums of `a`'s bit patterns (module docstring)."""
    bits = _bit_patterns(a)
    position = jnp.zeros(bits.shape, _U32)  # row-major index, built per axis so no reshape moves shards
    stride = 1
    for axis in reversed(range(bits.ndim)):
        position = position + lax.broadcasted_iota(_U32, bits.shape, axis) * _U32(stride % 2**32)
        stride *= bits.shape[axis]
    first = (bits ^ (position * _U32(0x9E3779B9))) * (position * _U32(2) + _U32(1))
    second = (bits ^ (position * _U32(0x85EBCA6B) + _U32(0x165667B1))) * ((position * _U32(0xC2B2AE35)) | _U32(1))
    return jnp.stack([jnp.sum(first, dtype=_U32), jnp.sum(second, dtype=_U32)])


@jax.jit
def _digests(leaves: list) -> list:
    return [_leaf_digest(leaf) for leaf in leaves]


def tree_digests(tree) -> dict[str, str]:
    """{path: 16 hex digits} for every array leaf of `tree` (device arrays where they are, NumPy on the
    default device)."""
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_digests([jnp.asarray(leaf) if isinstance(leaf, np.ndarray | np.generic) else leaf
                                    for _, leaf in paths_and_leaves]))
    return {jax.tree_util.keystr(path): f"{int(s[0]):08x}{int(s[1]):08x}"
            for (path, _), s in zip(paths_and_leaves, sums)}


def mismatched(tree, expected: dict[str, str]) -> list[str]:
    """The paths of `tree` whose digest differs from `expected` (or that `expected` lacks), and the
    paths `expected` has that `tree` lacks."""
    actual = tree_digests(tree)
    return sorted(p for p in set(actual) | set(expected) if actual.get(p) != expected.get(p))


def json_digest(value) -> str:
    """SHA-256 of `value` as canonical JSON (sorted keys): the data iterator's state."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
