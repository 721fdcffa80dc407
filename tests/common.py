"""Helpers shared by the tests: configs by name, float64 copies of params, a run's metrics rows."""

import csv
import os
import pathlib

import jax
import numpy as np

from deepseek_jax import defaults
from deepseek_jax.model import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def config(name: str = "tiny", arg: str = ""):
    return defaults.load_config(str(ROOT / "configs" / f"{name}.py") + (f":{arg}" if arg else ""))


def model_config(name: str = "tiny", **overrides) -> ModelConfig:
    return ModelConfig.from_dict(config(name).model).replace(**overrides)


def to_f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def micro_run_config(tmp_path, write_corpus=True, **train_overrides):
    """A run config small enough to train a few steps in seconds, on a corpus written to tmp_path (unless
    `write_corpus` is False: then it must be there already)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(24 if write_corpus else 0):  # Deterministic, varied text: 24 small documents.
        (corpus / f"doc{i:02d}.txt").write_text(
            "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(12)))
    c = config("tiny", "mtp=1")
    c.model.update(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                   qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_group=2, topk_group=1,
                   num_experts_per_tok=2, max_position_embeddings=64)
    c.data.update(source="files", path=str(corpus), seq_len=32, batch_size=4, validation_fraction=0.2,
                  prefetch=0)
    c.train.update(steps=6, warmup_steps=2, eval_every=3, eval_batches=2, log_every=1, sample_tokens=0)
    c.train.update(**train_overrides)
    c.checkpoint.update(every=3, keep=5, async_save=False)
    return c


def read_rows(workdir) -> list[dict]:
    """The rows of a run's metrics.csv."""
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def losses_by_step(workdir) -> dict[int, str]:
    """{step: the loss as written}: equal strings mean bit-for-bit equal losses."""
    return {int(r["step"]): r["loss"] for r in read_rows(workdir) if r.get("loss")}
