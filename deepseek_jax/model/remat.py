"""Backward-pass recomputation policies (`ModelConfig.remat`) for the decoder blocks.

DeepSeek-V3 (report section 3.2.3) recomputes every RMSNorm and the MLA up-projections in the backward
pass instead of storing their outputs. The modules tag those values with `checkpoint_name`; a policy
chooses what the backward may keep.
"""

import jax

# Names the modules give to values that are cheap to recompute and large to store.
RMSNORM = "rmsnorm"
MLA_UP_PROJ = "mla_up_proj"

POLICIES = {
    "none": None,  # No jax.checkpoint at all: store everything.
    "full": jax.checkpoint_policies.nothing_saveable,  # Recompute the whole block.
    "deepseek": jax.checkpoint_policies.save_anything_except_these_names(RMSNORM, MLA_UP_PROJ),
}
