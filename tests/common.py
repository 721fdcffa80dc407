"""Helpers shared by the tests: configs by name, float64 copies of params."""

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
