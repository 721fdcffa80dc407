"""The top-level names of the model's variables, router statistics and decode cache, defined once.

    DENSE 'dense_layers', MOE 'moe_layers'   the scanned decoder stacks: HF layers [0, k) and
                                             [k, num_hidden_layers), k = first_k_dense_replace
    mtp_name(d) 'mtp_d'                      MTP module d (0-based): HF layer num_hidden_layers + d
    MTP_CACHE 'mtp'                          the decode cache of the MTP blocks (depth as the layer axis)
    EMBED, NORM, HEAD                        the embedding, the final norm, the output head

A stack's leading (layer) axis has a logical name of its own: 'layers' for the dense stack and
'stage' for the MoE stack, which a pipeline splits over its ranks (parallel/mesh.py's rules).
"""

from __future__ import annotations

DENSE = "dense_layers"
MOE = "moe_layers"
STACKS = (DENSE, MOE)  # In the order the decoder runs them.
LAYER_AXIS = {DENSE: "layers", MOE: "stage"}
EMBED, NORM, HEAD = "embed_tokens", "norm", "lm_head"
MTP_PREFIX = "mtp_"
MTP_CACHE = "mtp"


def mtp_name(depth: int) -> str:
    """The name of MTP module `depth` (0-based)."""
    return f"{MTP_PREFIX}{depth}"


def mtp_depth(name: str) -> int | None:
    """The depth of an MTP module's name ('mtp_1' -> 1); None for any other name."""
    suffix = name[len(MTP_PREFIX):]
    return int(suffix) if name.startswith(MTP_PREFIX) and suffix.isdigit() else None


def stack_lengths(cfg) -> dict[str, int]:
    """Layers in each stack the model has (a ModelConfig's dense and MoE counts; empty stacks left out)."""
    lengths = {DENSE: cfg.num_dense_layers, MOE: cfg.num_moe_layers}
    return {name: n for name, n in lengths.items() if n}
