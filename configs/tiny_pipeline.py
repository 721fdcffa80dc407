"""The tiny model pipelined over 4 ranks x 2 data shards (8 devices): DualPipe, 8 micro-batches.

    python -m deepseek_jax.train --config=configs/tiny_pipeline.py --workdir=runs/pipeline --cpu_devices=8 \
        [--config.parallel.pipeline=1f1b|gpipe|zb_h1|dualpipev] [--config.parallel.data=1]

One dense + 4 MoE layers (one MoE layer per stage; DualPipeV's 8 stages need 8 MoE layers:
--config.model.num_hidden_layers=9). Batches of 16 rows: 8 micro-batches of 2 rows, one per data shard.
"""

import pathlib

import ml_collections

from deepseek_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = defaults.load_config(f"{pathlib.Path(__file__).with_name('tiny.py')}{':' + arg if arg else ''}")
    config.model.num_hidden_layers = 5  # 1 dense + 4 MoE layers.
    config.data.batch_size = 16
    config.parallel.update(stage=4, data=2, pipeline="dualpipe", microbatches=8)
    return config
