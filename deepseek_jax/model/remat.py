"""Backward-pass recomputation policies (`ModelConfig.remat`) for the decoder blocks.

DeepSeek-V3 (report section 3.2.3) recomputes every RMSNorm and the MLA up-projections in the backward
pass instead of storing their outputs. A policy that merely refuses to save the *named* norm output
does not achieve that: the unnamed value it was computed from is the same array and would be saved in
its place. So the modules name what is worth keeping (the outputs of weight matmuls, of the attention
core and of the routed experts) and the 'deepseek' policy keeps only those; the up-projections carry a
name of their own, so they and every RMSNorm are recomputed from the kept values.
"""

import jax

# What the modules name with `checkpoint_name`.
LINEAR = "linear"  # Output of a Linear (a weight matmul), kept.
MLA_UP_PROJ = "mla_up_proj"  # Output of q_b_proj / kv_b_proj: recomputed under 'deepseek'.
ATTENTION = "attention_core"  # softmax(QK^T)V, kept (recomputing it would redo the quadratic part).
EXPERTS = "routed_experts"  # Grouped-GEMM outputs of the routed experts, kept.
RMSNORM = "rmsnorm"  # Output of an RMSNorm: recomputed under 'deepseek'.

POLICIES = {
    "none": None,  # No jax.checkpoint at all: store everything.
    "full": jax.checkpoint_policies.nothing_saveable,  # Recompute the whole block.
    "deepseek": jax.checkpoint_policies.save_only_these_names(LINEAR, ATTENTION, EXPERTS),
}
