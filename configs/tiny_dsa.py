"""configs/tiny.py with DeepSeek Sparse Attention (V3.2): a lightning indexer in every attention layer, each
query attending to its 64 best of up to 256 keys, trained in the report's two stages (section 2.1.1).

    # 1. dense warm-up: the tiny model of `make train`, frozen; only the new indexers learn (KL to attention)
    python -m deepseek_jax.train --config=configs/tiny_dsa.py:stage=dense_warmup \
        --config.train.init_from=runs/tiny --workdir=runs/tiny_dsa_warmup
    # 2. sparse training: top-64 attention trains the whole model; the indexers keep their KL
    python -m deepseek_jax.train --config=configs/tiny_dsa.py:stage=sparse \
        --config.train.init_from=runs/tiny_dsa_warmup --workdir=runs/tiny_dsa

Variants: `stage=dense_warmup|sparse`, `topk=N` (comma-separated).
"""

import pathlib

import ml_collections

from deepseek_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = defaults.parse_variant(arg, stage="sparse", topk=64)
    config = defaults.load_config(str(pathlib.Path(__file__).with_name("tiny.py")))
    config.model.index_n_heads = 4  # V3.2: 64 heads of 128 for a 7168-wide model.
    config.model.index_head_dim = 32
    config.model.index_topk = opts.topk  # V3.2: 2048 of up to 128K.
    config.train.indexer_stage = opts.stage
    # The report's warm-up: 1000 steps at 1e-3 for 2.1B tokens; here both stages are short runs.
    config.train.steps = 100 if opts.stage == "dense_warmup" else 200
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 10
    config.train.eval_every = 50
    config.checkpoint.every = 50
    return config
