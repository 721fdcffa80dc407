"""Import: a Hugging Face DeepSeek-V3/R1/V3.2/V2 checkpoint -> (ModelConfig, variables), streamed onto a mesh.

Everything is checked before any weight is read: every tensor the model needs is present with the right
shape (FP8 weights with a scale grid that fits), and every tensor of the checkpoint is used (the MTP layers'
copies of the embedding and output head are the only known-redundant ones; they are compared with the main
ones). Then the variables are built one at a time. For each variable and each distinct device shard of it,
the HF tensors that shard needs are read one by one (dequantised from FP8 to float32, transposed to our
[in, out] kernels, rope rows permuted if the checkpoint is half-split), copied into the shard's host
buffer, and the buffer is put on every device holding that shard, then dropped. Host memory therefore peaks
at about one device shard of one variable plus one HF tensor (float32), on top of the imported output
itself when the devices are the host's CPU; `experiments/bench_import_memory.py` measures it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from deepseek_jax.convert import hf_config, layout
from deepseek_jax.convert.safetensors_io import RAW_READ, CheckpointFiles
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.functional import logical_axes
from deepseek_jax.model.moe import ROUTING
from deepseek_jax.ops import fp8_quant

Variables = dict[str, Any]
SCALE_SUFFIX = "_scale_inv"
_LIST_LIMIT = 20  # Tensors named per problem in an error message.

_dequantize = jax.jit(fp8_quant.dequantize_blockwise_2d, static_argnames=("block", "out_dtype"))


def _listing(names: Sequence[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return ", ".join(names[:_LIST_LIMIT]) + more


def _mtp_depth(cfg: ModelConfig, files: CheckpointFiles, requested: int | None) -> tuple[ModelConfig, set[str]]:
    """The MTP depth to import, and the checkpoint tensors of MTP layers deliberately left out."""
    declared = cfg.num_nextn_predict_layers
    first = cfg.num_hidden_layers
    held = [[n for n in files.tensors if n.startswith(f"model.layers.{first + k}.")] for k in range(declared)]
    if requested is None:
        depth = next((k for k, names in enumerate(held) if not names), declared)
        if depth < declared:
            logging.warning(
                "config.json declares num_nextn_predict_layers=%d but the checkpoint has no tensors for MTP depth "
                "%d (model.layers.%d.*; transformers' save_pretrained drops them): importing %d MTP module(s).",
                declared, depth, first + depth, depth)
    else:
        if not 0 <= requested <= declared:
            raise ValueError(f"num_nextn_predict_layers={requested} requested but config.json declares "
                             f"{declared} MTP layer(s).")
        depth = requested
    # Deeper MTP layers are left out only on request; otherwise they surface as unused tensors.
    skipped = {n for names in held[depth:] for n in names} if requested is not None else set()
    if skipped:
        logging.info("Leaving out %d tensors of MTP depths >= %d (model.layers.%d.* on).", len(skipped), depth,
                     first + depth)
    return cfg.replace(num_nextn_predict_layers=depth), skipped


def _check_tensors(cfg: ModelConfig, fmt: hf_config.CheckpointFormat, plan: list[layout.Leaf],
                   files: CheckpointFiles, skipped: set[str]) -> None:
    """Raises one ValueError listing every missing, misshapen, unquantisable or unused tensor."""
    expected = {name: leaf.hf_shape for leaf in plan for name in leaf.names()}
    missing = [n for n in expected if n not in files]
    problems = []
    used = set(expected) | skipped | set(layout.redundant_names(cfg))
    for name, shape in expected.items():
        if name not in files:
            continue
        info = files.tensors[name]
        if info.shape != shape:
            problems.append(f"{name} has shape {list(info.shape)}, the config implies {list(shape)}")
        if info.dtype not in ("F32", "BF16", "F16") + RAW_READ:
            problems.append(f"{name} has dtype {info.dtype}, expected a floating-point weight")
        if info.dtype in RAW_READ:
            scale = name + SCALE_SUFFIX
            if scale not in files:
                problems.append(f"{name} is {info.dtype} but its block scales {scale} are missing")
            elif fmt.fp8_block is None:
                problems.append(f"{name} is {info.dtype} but config.json has no quantization_config")
            elif len(shape) != 2:
                problems.append(f"{name} is {info.dtype} but only 2-D weights can be block-quantised")
            else:
                grid = tuple(fp8_quant.num_tiles(d, fmt.fp8_block) for d in shape)
                if files.tensors[scale].shape != grid:
                    problems.append(f"{scale} has shape {list(files.tensors[scale].shape)}; a {list(shape)} weight "
                                    f"in {fmt.fp8_block}x{fmt.fp8_block} blocks needs {list(grid)}")
                used.add(scale)
    unused = [n for n in files.tensors if n not in used]
    if missing or problems or unused:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors the config needs are missing: {_listing(missing)}")
        if problems:
            parts.append("; ".join(problems[:_LIST_LIMIT]))
        if unused:
            parts.append(f"{len(unused)} tensors of the checkpoint would be unused (a config/weights mismatch?): "
                         f"{_listing(unused)}")
        raise ValueError(f"checkpoint {files.root} does not match its config.json: " + ". ".join(parts) + ".")


class _Reader:
    """HF tensors by name as float32 numpy arrays in HF layout, dequantised and in interleaved-rope order."""

    def __init__(self, files: CheckpointFiles, fmt: hf_config.CheckpointFormat):
        self.files, self.fmt = files, fmt

    def __call__(self, name: str, rope: layout.RopeRows | None) -> np.ndarray:
        data = self.files.read(name)
        if self.files.tensors[name].dtype in RAW_READ:
            scale = self.files.read(name + SCALE_SUFFIX).astype(np.float32)
            data = np.asarray(_dequantize(data, scale, block=self.fmt.fp8_block, out_dtype=jnp.float32))
        data = data.astype(np.float32, copy=False)
        if rope is not None and not self.fmt.rope_interleave:
            data = data[layout.rope_row_order(rope, data.shape[0], to_interleaved=True)]
        return data


def _assemble(leaf: layout.Leaf, read: _Reader, bounds: tuple[tuple[int, int], ...], dtype: np.dtype
              ) -> np.ndarray:
    """The host buffer of one shard of `leaf` (global index ranges `bounds`), one HF tensor at a time."""
    out = np.empty([stop - start for start, stop in bounds], dtype)
    stacked = [range(start, stop) for start, stop in bounds[:leaf.num_stacked]]
    own = tuple(slice(start, stop) for start, stop in bounds[leaf.num_stacked:])
    for position in itertools.product(*[range(len(r)) for r in stacked]):
        tensor = read(leaf.name_at(tuple(r[p] for r, p in zip(stacked, position))), leaf.rope)
        out[position] = (tensor.T if leaf.transpose else tensor)[own]
    return out


def _load_leaf(leaf: layout.Leaf, read: _Reader, sharding: Sharding, dtype: np.dtype) -> jax.Array:
    """One variable, placed shard by shard; each distinct shard is read once and put on all its devices."""
    index_map = sharding.addressable_devices_indices_map(leaf.shape)
    by_bounds: dict[tuple[tuple[int, int], ...], list[jax.Device]] = {}
    for device, index in index_map.items():
        bounds = tuple(s.indices(d)[:2] for s, d in zip(index, leaf.shape))
        by_bounds.setdefault(bounds, []).append(device)
    placed = {}
    for bounds, devices in by_bounds.items():
        host = _assemble(leaf, read, bounds, dtype)
        for device in devices:
            placed[device] = jax.device_put(host, device)
        del host
    return jax.make_array_from_single_device_arrays(leaf.shape, sharding, [placed[d] for d in index_map])


def _target_shardings(cfg: ModelConfig, plan: list[layout.Leaf], mesh: Mesh | None, shardings: Any,
                      rules: Sequence[tuple[str, Any]] | None) -> list[Sharding]:
    if shardings is not None:
        flat = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, Sharding))[0]
        by_path = {tuple(k.key for k in path): s for path, s in flat}
        wanted = {leaf.path for leaf in plan}
        if set(by_path) != wanted:
            missing = ["/".join(p) for p in wanted - set(by_path)]
            unexpected = ["/".join(p) for p in set(by_path) - wanted]
            raise ValueError(f"`shardings` must match the variables tree: missing {_listing(missing)}; "
                             f"unexpected {_listing(unexpected)}.")
        return [by_path[leaf.path] for leaf in plan]
    if mesh is None:
        return [SingleDeviceSharding(jax.local_devices()[0])] * len(plan)
    if rules is None:
        return [NamedSharding(mesh, PartitionSpec())] * len(plan)
    specs = nn.logical_to_mesh_sharding(logical_axes(cfg), mesh, rules)
    by_path = {tuple(k.key for k in path): s for path, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, Sharding))[0]}
    return [by_path[leaf.path] for leaf in plan]


def _check_copies(cfg: ModelConfig, files: CheckpointFiles, allow_mismatch: bool) -> None:
    """The MTP layers' embedding/head copies must equal the main ones (compared in row chunks)."""
    for copy, main in layout.redundant_names(cfg).items():
        if copy not in files:
            continue
        shape, main_shape = files.tensors[copy].shape, files.tensors[main].shape
        if shape != main_shape:
            raise ValueError(f"{copy} has shape {list(shape)} but {main} has {list(main_shape)}.")
        rows = max(1, (1 << 24) // max(1, math.prod(shape[1:])))
        worst = 0.0
        for start in range(0, shape[0], rows):
            chunk = slice(start, min(start + rows, shape[0]))
            a = files.read(copy, chunk).astype(np.float32)
            b = files.read(main, chunk).astype(np.float32)
            worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)))
        if worst > 0 or np.isnan(worst):
            message = (f"{copy} differs from {main} (max |difference| = {worst:.3g}); deepseek_jax's MTP modules "
                       f"share the main model's embedding and output head, so the copy cannot be kept")
            if not allow_mismatch:
                raise ValueError(message + ". Pass allow_mtp_copy_mismatch=True to import with the main tensor.")
            logging.warning("%s; using %s.", message, main)


def load_checkpoint(path: str, *, mesh: Mesh | None = None, shardings: Any = None,
                    rules: Sequence[tuple[str, Any]] | None = None, dtype: Any = jnp.float32,
                    num_nextn_predict_layers: int | None = None, allow_mtp_copy_mismatch: bool = False
                    ) -> tuple[ModelConfig, Variables]:
    """Reads a Hugging Face DeepSeek-V3/R1/V2 checkpoint directory into (ModelConfig, variables).

    Args:
      path: directory with config.json and *.safetensors (+ model.safetensors.index.json when sharded).
      mesh: place every variable on this mesh (replicated, or by `rules`); None = the first local device.
      shardings: a pytree of `jax.sharding.Sharding` matching the variables tree; overrides `mesh`/`rules`.
      rules: logical-axis -> mesh-axis rules (flax `logical_to_mesh_sharding` form) used with `mesh`.
      dtype: parameter dtype (float32 default; FP8 weights are dequantised to float32 first). The routing
        biases stay float32.
      num_nextn_predict_layers: MTP depths to import; None = what config.json declares, minus trailing depths
        the checkpoint holds no tensors for (logged).
      allow_mtp_copy_mismatch: import even if an MTP layer's embedding/head copy differs from the main one.

    Returns:
      (model_config, variables): variables = {'params': ..., 'routing': ...} as `deepseek_jax.model.init`.

    Raises:
      ValueError: unknown architecture or config key, missing shard, missing/unused/misshapen tensor.
    """
    files = CheckpointFiles(path)
    cfg, fmt = hf_config.from_hf(files.config)
    cfg, skipped = _mtp_depth(cfg, files, num_nextn_predict_layers)
    plan = layout.leaves(cfg)
    _check_tensors(cfg, fmt, plan, files, skipped)
    _check_copies(cfg, files, allow_mtp_copy_mismatch)
    read = _Reader(files, fmt)
    variables: Variables = {"params": {}, ROUTING: {}}
    for leaf, sharding in zip(plan, _target_shardings(cfg, plan, mesh, shardings, rules)):
        leaf_dtype = np.dtype(jnp.float32 if leaf.path[0] == ROUTING else jnp.dtype(dtype))
        node = variables
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = _load_leaf(leaf, read, sharding, leaf_dtype)
    logging.info("Imported %s: %s, %d layers, %d MTP, %d tensors.", path, fmt.architecture,
                 cfg.num_hidden_layers, cfg.num_nextn_predict_layers, len(files.tensors))
    return cfg, variables
