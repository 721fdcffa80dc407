"""The run configuration's skeleton, shared by every `configs/*.py`, and variant-argument parsing.

A config file builds on `base_config()` and fills in `config.model` (Hugging Face key names). Groups
other than `model` carry the defaults documented key by key below.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from deepseek_jax.data.config import default_data_config


def parse_variant(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a `get_config` argument like "mtp=0,dispatch=dense" over typed defaults.

    Unknown keys and values that do not parse as the default's type raise ValueError naming the key.
    """
    opts = ml_collections.ConfigDict(defaults)
    if not arg:
        return opts
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise ValueError(f"config argument {item!r}: expected key=value with key in {sorted(defaults)}.")
        kind = type(defaults[key])
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                parsed = value.lower() in ("true", "1")
            else:
                parsed = kind(value)
        except ValueError:
            raise ValueError(f"config argument {key}={value!r} is not a {kind.__name__}.") from None
        opts[key] = parsed
    return opts


def base_config() -> ml_collections.ConfigDict:
    """All groups with their defaults; `model` is left for the config file to fill."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # Every random choice of the run (init, sampling) derives from this seed.
    config.model = ml_collections.ConfigDict()  # HF DeepSeek-V3 keys, see deepseek_jax/model/config.py.
    config.data = default_data_config()  # Documented key by key in deepseek_jax/data/config.py.
    config.train = train_config()
    config.checkpoint = checkpoint_config()
    config.fp8 = fp8_config()
    config.parallel = parallel_config()
    return config


def parallel_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = 1  # Pipeline ranks (devices on the 'stage' mesh axis); 1 = no pipeline.
    c.pipeline = "dualpipe"  # Schedule: gpipe, 1f1b, zb_h1, dualpipe or dualpipev.
    c.microbatches = 8  # Micro-batches per step (data.batch_size must be a multiple).
    # stage x data x expert x tensor must equal the device count (of all processes).
    c.data = 1  # Data-parallel ranks; the optimizer state is sharded over them (ZeRO-1).
    c.expert = 1  # Expert-parallel ranks: routed experts split over them, tokens sent by all-to-all; the
    # batch is sharded over data x expert.
    c.tensor = 1  # Tensor-parallel ranks for attention heads, dense MLP widths and the vocabulary.
    c.capacity_factor = 0.0  # Expert parallelism: per-device buffer = factor x fair share; 0 = dropless.
    c.node_limit = 0  # Node-limited routing: each token's experts on at most this many device groups ...
    c.nodes = 0  # ... of this many (0 = one group per expert-parallel rank). V3: 4 of 8 nodes.
    # Overrides of the logical-axis rules (parallel/mesh.py), e.g. "vocab=,heads=tensor": a parameter
    # logical name = the mesh axes (joined by +) it is split over, or nothing to replicate it.
    c.rules = ""
    return c


def fp8_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = False  # FP8 GEMMs in every eligible Linear (not the head, router, norms, attention core).
    c.recipe = "fine_grained"  # 'fine_grained' (DeepSeek-V3: 1x128 / 128x128 tiles) or 'per_tensor'.
    c.tile = 128  # Tile length / block edge of the fine-grained recipe.
    c.grad_dtype = "float8_e4m3fn"  # Output gradients' FP8 dtype (V3: E4M3; 'float8_e5m2' = hybrid).
    return c


def train_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.steps = 1000  # Optimizer steps of the run.
    c.learning_rate = 3e-3  # Peak learning rate.
    c.warmup_steps = 50  # Linear warmup from 0.
    c.decay_start = 0.6  # Fraction of `steps` after which the cosine decay starts (constant before).
    c.final_lr_fraction = 0.1  # The cosine ends at this fraction of the peak.
    c.b1 = 0.9  # AdamW beta1 (V3: 0.9).
    c.b2 = 0.95  # AdamW beta2 (V3: 0.95).
    c.eps = 1e-8
    c.weight_decay = 0.1  # On matrices only, never norms or biases (V3: 0.1).
    c.clip_norm = 1.0  # Global gradient-norm clipping (V3: 1.0).
    c.moment_dtype = ""  # Adam moments' dtype: '' = float32 like the params, or 'bfloat16' as in V3.
    c.mtp_lambda = 0.3  # MTP loss weight early in training (V3: 0.3) ...
    c.mtp_lambda_late = 0.1  # ... and late (V3: 0.1) ...
    c.mtp_lambda_switch = 0.7  # ... switching at this fraction of `steps` (V3: 10T of 14.8T tokens).
    c.balance_alpha = 1e-4  # Sequence-wise balance loss weight (V3: 1e-4); 0 disables it.
    c.bias_update_speed = 1e-3  # Loss-free balancing gamma (V3: 1e-3); 0 disables the bias update.
    c.ema_decay = 0.999  # Host-memory EMA of the params; 0 disables it.
    c.max_bad_steps = 5  # Stop after this many consecutive steps with a NaN/Inf loss or gradient.
    c.log_every = 10  # Steps between metric rows (CSV, TensorBoard).
    c.eval_every = 100  # Steps between validation passes (also at step 0 and at the end).
    c.eval_batches = 16  # Validation batches per pass (0 = the whole validation split).
    c.sample_prompt = "def fibonacci(n):"  # Text the model continues at the end of training.
    c.sample_tokens = 96  # Tokens generated for that sample (0 = no sample).
    c.sample_temperature = 0.7  # 0 = greedy (tiny models then often repeat whitespace).
    c.init_from = ""  # A `python -m deepseek_jax.convert` workdir whose weights start the run (fine-tuning).
    # DeepSeek Sparse Attention (V3.2 report, section 2.1.1), for a model with a lightning indexer:
    # 'dense_warmup' (attention stays dense, every other weight frozen, the indexer learns the attention's
    # distribution by KL), 'sparse' (top-k attention trains the model; the indexer keeps its KL on the selected
    # keys), or '' (no indexer loss).
    c.indexer_stage = ""
    c.indexer_loss_weight = 1.0  # Weight of the indexer's KL in the loss (it trains the indexer alone).
    return c


def checkpoint_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every = 200  # Steps between checkpoints (and one at the end, and on SIGTERM).
    c.keep = 3  # Checkpoints kept (oldest deleted first).
    c.async_save = True  # Write in the background while training continues.
    # Run fields a resume may change on purpose, comma-separated (e.g. "data.batch_size,train.learning_rate").
    # A resume that changes any other field of train/checkpoint.py's RESUME_FIELDS (data stream, batch shape,
    # optimizer; the RL jobs': rl/config.py) is refused with the field and both values. train.steps may always
    # change (extending a run).
    c.allow_changes = ""
    return c


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads "path/to/config.py[:arg]" the way `--config` does (for notebooks, tests, scripts)."""
    import importlib.util
    import pathlib

    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(f"config file {path!r} does not exist (paths are relative to {pathlib.Path.cwd()}).")
    module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
