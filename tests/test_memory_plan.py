"""The memory plan (train/memory.py, `python -m deepseek_jax.plan`): shapes and shardings only.

References: the state really allocated on the 8 simulated devices, and hand-computed buffer sizes.
"""

import jax
import pytest
from common import config

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.train import placement
from deepseek_jax.train.memory import plan_memory
from deepseek_jax.train.optimizer import make_optimizer


def _line(plan, name):
    (line,) = [line for line in plan.lines if line.name == name]
    return line.bytes


@pytest.fixture(scope="module")
def tiny_plan():
    return plan_memory(config("tiny_pipeline"), stash_variants=(("none", False), ("deepseek", False)))


def test_state_bytes_equal_the_allocated_state(tiny_plan):
    c = config("tiny_pipeline")
    cfg = ModelConfig.from_dict(c.model)
    tx = make_optimizer(c.train)
    state = placement.init_sharded_state(cfg, tx, jax.random.key(0), mesh_lib.make_mesh(c.parallel),
                                         mesh_lib.run_rules(c.parallel))
    most = lambda tree: max(placement.per_device_bytes(tree).values())  # noqa: E731
    assert _line(tiny_plan, "parameters") == most((state.params, state.routing))
    assert _line(tiny_plan, "Adam moments") == most(state.opt_state)
    assert _line(tiny_plan, "stage slots fetched") > 0 and _line(tiny_plan, "shared parameters gathered") > 0


def test_stash_holds_no_logits_and_shrinks_with_recomputation(tiny_plan):
    """The head runs under recomputation in a pipeline stage: a micro-batch's residuals do not grow with
    the vocabulary (the logits [b, T, V] are recomputed in the backward); remat shrinks them."""
    wide = config("tiny_pipeline")
    wide.model.vocab_size *= 4
    assert plan_memory(wide, stash_variants=()).rank_buffers.stash_slot == tiny_plan.rank_buffers.stash_slot
    stash = {line.name: line.bytes for line in tiny_plan.stash_lines}
    assert stash["remat=deepseek"] < stash["remat=none"]
    # DualPipe on 4 ranks holds 5 micro-batches at its peak (Table 2: PP + 1).
    assert _line(tiny_plan, "activation stash") == 5 * tiny_plan.rank_buffers.stash_slot
    assert "total" in tiny_plan.format()


def test_dispatch_buffers_by_hand():
    """v3_layout without its pipeline: 16 rows / (data 2 x expert 2) = 4 rows of 128 tokens per device,
    n = 512; 8 experts over 2 devices (4 each), 2 per token. Dropless: C = n x min(2, 4) = 1024 rows per
    destination; capacity factor 1: C = 1.0 x n x 2 / 2 = 512. Four float32 buffers of 2 x C x D: send and
    receive, for the dispatch and the combine."""
    c = config("v3_layout")
    c.parallel.stage = 1
    c.data.seq_len = 128
    D = c.model.hidden_size
    assert _line(plan_memory(c), "EP dispatch buffers") == 4 * (2 * 1024 * D) * 4
    c.parallel.capacity_factor = 1.0
    assert _line(plan_memory(c), "EP dispatch buffers") == 4 * (2 * 512 * D) * 4


def test_uneven_stages_are_planned_as_the_largest():
    c = config("tiny_pipeline")
    c.model.num_hidden_layers = 8  # 7 MoE layers over 4 stages.
    plan = plan_memory(c, stash_variants=())
    assert any("7 MoE layers do not split evenly into 4 stages: planned with 2 per stage" in n for n in plan.notes)


@pytest.mark.parametrize("field, value, message", [
    ("expert", 3, "parallel.expert"),
    ("microbatches", 3, "parallel.microbatches"),
])
def test_layouts_that_do_not_divide_name_the_field(field, value, message):
    c = config("v3_layout")
    c.parallel[field] = value
    with pytest.raises(ValueError, match=message):
        plan_memory(c)
