"""Parameter counts from shapes alone (jax.eval_shape: nothing is allocated)."""

from __future__ import annotations

import math

import jax

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.functional import abstract_variables
from deepseek_jax.model.names import EMBED, mtp_depth


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", k)) for k in path]


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """{'total', 'activated', 'mtp', 'embedding'} trainable parameter counts.

    total: the main model (embedding, decoder layers, final norm, output head), MTP excluded — the
      convention of DeepSeek-V3's "671B total".
    activated: parameters a token passes through in the main model: everything in `total` except the
      routed experts a token does not use (K of E per MoE layer). The input embedding row lookup is
      counted as the whole table, as is the output head, matching the report's "37B activated".
    mtp: the MTP modules' own parameters (their embedding and head are the main model's, not counted
      again). The released checkpoints store a copy of both, which is why Hugging Face quotes 685B.
    embedding: the input embedding table alone, so a reader can subtract it.
    """
    params = abstract_variables(cfg)["params"]
    counts = {"total": 0, "activated": 0.0, "mtp": 0, "embedding": 0}
    expert_fraction = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = _path_names(path)
        size = math.prod(leaf.shape)
        if mtp_depth(names[0]) is not None:
            counts["mtp"] += size
            continue
        counts["total"] += size
        counts["activated"] += size * expert_fraction if "experts" in names else size
        if names[0] == EMBED:
            counts["embedding"] += size
    counts["activated"] = int(round(counts["activated"]))
    return counts
