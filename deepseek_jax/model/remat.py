"""Backward-pass recomputation policies (`ModelConfig.remat`) for the decoder blocks.

DeepSeek-V3 (report section 3.2.3) recomputes every RMSNorm and the MLA up-projections in the backward
pass instead of storing their outputs. A policy that merely refuses to save the *named* norm output
does not achieve that: the unnamed value it was computed from is the same array and would be saved in
its place. So the modules name what is worth keeping (the outputs of weight matmuls, of the attention
core and of the routed experts) and the 'deepseek' policy keeps only those; the up-projections carry a
name of their own, so they and every RMSNorm are recomputed from the kept values.

The output head's logits have a name of their own too, which no policy keeps: where the head runs
under recomputation (`head_policy`, a pipeline's last stage) its backward recomputes the logits from
the final hidden state instead of storing [B, T, V] values per micro-batch in flight.
"""

import jax

# What the modules name with `checkpoint_name`.
LINEAR = "linear"  # Output of a Linear (a weight matmul), kept.
MLA_UP_PROJ = "mla_up_proj"  # Output of q_b_proj / kv_b_proj: recomputed under 'deepseek'.
ATTENTION = "attention_core"  # softmax(QK^T)V, kept (recomputing it would redo the quadratic part).
EXPERTS = "routed_experts"  # Grouped-GEMM outputs of the routed experts, kept.
RMSNORM = "rmsnorm"  # Output of an RMSNorm: recomputed under 'deepseek'.
LOGITS = "logits"  # Output of the output head: never kept by `head_policy`.

POLICIES = {
    "none": None,  # No jax.checkpoint at all: store everything.
    "full": jax.checkpoint_policies.nothing_saveable,  # Recompute the whole block.
    "deepseek": jax.checkpoint_policies.save_only_these_names(LINEAR, ATTENTION, EXPERTS),
}


def head_policy(name: str):
    """The policy for the output heads (final norm, head, MTP modules and the loss) under `jax.checkpoint`:
    the block policy `name`, and for 'none' every named value but the logits; the logits, the losses
    computed from them and anything unnamed are recomputed in the backward."""
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    kept = (LINEAR, ATTENTION, EXPERTS) + ((MLA_UP_PROJ, RMSNORM) if name == "none" else ())
    return jax.checkpoint_policies.save_only_these_names(*kept)
