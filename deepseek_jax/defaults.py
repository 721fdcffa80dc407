"""The run configuration's skeleton, shared by every `configs/*.py`, and variant-argument parsing.

A config file builds on `base_config()` and fills in `config.model` (Hugging Face key names). Groups
other than `model` carry the defaults documented key by key below.
"""

from __future__ import annotations

from typing import Any

import ml_collections


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
    config.seed = 0  # Every random choice of the run derives from this seed.
    config.model = ml_collections.ConfigDict()  # HF DeepSeek-V3 keys, see deepseek_jax/model/config.py.
    return config


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
