"""Every notebook runs top to bottom (with shrunk parameters) and is stored without outputs."""

import pathlib

import nbformat
import pytest
from common import ROOT
from nbclient import NotebookClient

NOTEBOOKS = sorted((ROOT / "experiments" / "notebooks").glob("*.ipynb"))

# Appended before a notebook's own overrides (it runs before the notebook imports jax): shrunk runs are
# compile-bound, so skip XLA's expensive CPU passes (same numerics) and share compilations across runs
# through JAX's persistent cache, as tests/conftest.py does.
FAST = ('import os, tempfile\n'
        'os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + '
        '" --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"\n'
        'os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "deepseek_jax_jax_cache")\n'
        'os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"\n')

# Per-notebook overrides appended to the cell tagged "parameters".
SHRINK = {
    "01_quickstart.ipynb": "STEPS = 6\nPLOT_EVERY = 3\nSAMPLE_TOKENS = 8",
    "02_mla.ipynb": FAST + "PARITY_TOKENS = 8\nSPEED_CONFIG = 'tiny'\nCONTEXTS = (32,)\nNEW_TOKENS = 4\n"
                    "DSA_TOKENS = 16",
    "03_moe_balancing.ipynb": FAST + "STEPS = 4\nBATCH_SIZE = 2\nSEQ_LEN = 32\nPROBE_EVERY = 2",
    "04_mtp.ipynb": FAST + "STEPS = 4\nBATCH_SIZE = 2\nSEQ_LEN = 32\nPLOT_EVERY = 2\nPROBE_EVERY = 4\nPROMPTS = 2\n"
                    "PROMPT_LEN = 8\nNEW_TOKENS = 6",
    "05_pipelines.ipynb": FAST + "BUBBLE_PP = (4, 8)\nRUN_SCHEDULES = ('1f1b',)\nSEQ_LEN = 16\nTRAIN_STEPS = 1",
    "06_fp8.ipynb": FAST + "OUTLIERS = (1, 1e4)\nRUNS = ('bf16', 'fp8')\nSTEPS = 2\nBATCH_SIZE = 2\nSEQ_LEN = 32\n"
                    "MODEL_OVERRIDES = dict(num_hidden_layers=1, num_nextn_predict_layers=0)",
    "07_grpo.ipynb": FAST + "SFT_STEPS = 2\nGRPO_STEPS = 2\nNUM_EVAL = 4\nEVALS = 1\nTASK_OVERRIDES = dict(digits=1)\n"
                     "RL_OVERRIDES = dict(prompts_per_step=2, group_size=3)\n"
                     "MODEL_OVERRIDES = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, "
                     "num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, "
                     "v_head_dim=8)",
    "08_hf_checkpoint.ipynb": FAST + "SEQ_LEN = 8\nGREEDY_TOKENS = 4",
}


def test_there_are_notebooks():
    assert NOTEBOOKS, "experiments/notebooks/ has no notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs; clear them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: pathlib.Path):
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    params[0].source += "\n" + SHRINK[path.name]
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
