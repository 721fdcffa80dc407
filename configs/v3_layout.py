"""The tiny DeepSeek-V3 laid out as V3 is (report section 3.2): DualPipe over 'stage', each stage's routed
experts split over 'expert', ZeRO-1 over 'data', node-limited routing; 2 x 2 x 2 = 8 devices.

    python -m deepseek_jax.train --config=configs/v3_layout.py --workdir=runs/v3_layout --cpu_devices=8

One dense + 4 MoE layers (two per pipeline stage), 8 routed experts in 2 device groups of 4 (each token's
experts on at most 1 group, as V3 keeps a token on at most 4 of its 8 nodes). Batches of 16 rows: 4
micro-batches of 4 rows, one per data x expert shard. Any other layout by flags, e.g.
--config.parallel.stage=4 --config.parallel.data=1 (then node_limit needs parallel.nodes=2).
"""

import pathlib

import ml_collections

from deepseek_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = defaults.load_config(f"{pathlib.Path(__file__).with_name('tiny.py')}{':' + arg if arg else ''}")
    config.model.num_hidden_layers = 5  # 1 dense + 4 MoE layers.
    config.data.batch_size = 16
    config.parallel.update(stage=2, data=2, expert=2, pipeline="dualpipe", microbatches=4,
                           node_limit=1)  # Each token's experts within one of the 2 expert groups.
    return config
