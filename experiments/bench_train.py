"""Training throughput on this machine: tokens/s, model FLOPs per token and MFU.

    python experiments/bench_train.py        (make bench)

For configs/tiny.py and configs/small.py: compiles the real train step, times steps after a warm-up,
and divides the model's FLOP/s (analytic, deepseek_jax/model/flops.py: XLA's cost analysis counts a
scanned layer stack once and a ragged_dot as dense, so it is reported beside, not used) by a matmul
peak measured in the same run (a large float32 jnp.dot). Writes
experiments/results/bench_train.json.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp

from deepseek_jax import defaults
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.flops import training_flops_per_token
from deepseek_jax.model.param_count import count_params
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.optimizer import make_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Achieved FLOP/s of a large float32 matmul: the practical peak of this machine."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        c = dot(a, b)
    c.block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def synthetic_batch(batch: int, length: int) -> dict:
    tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, 256, jnp.int32)
    return {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
            "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)}


def bench_config(name: str, steps: int) -> dict:
    config = defaults.load_config(str(ROOT / "configs" / f"{name}.py"))
    cfg = ModelConfig.from_dict(config.model)
    tx = make_optimizer(config.train)
    state = step_lib.init_state(cfg, tx, jax.random.key(0))
    batch = synthetic_batch(config.data.batch_size, config.data.seq_len)
    step = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, train_cfg=config.train, tx=tx),
                   donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    flops = float(compiled.cost_analysis().get("flops", float("nan")))
    state, metrics = compiled(state, batch)  # Warm-up.
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    tokens = config.data.batch_size * config.data.seq_len
    counts = count_params(cfg)
    return {
        "config": f"configs/{name}.py", "batch": config.data.batch_size, "seq_len": config.data.seq_len,
        "params": counts, "compile_seconds": compile_seconds, "seconds_per_step": seconds,
        "tokens_per_second": tokens / seconds, "xla_flops_per_step": flops,
        "xla_flops_per_token": flops / tokens,
        "model_flops_per_token": training_flops_per_token(cfg, config.data.seq_len),
        "achieved_flops_per_second": training_flops_per_token(cfg, config.data.seq_len) * tokens / seconds,
    }


def main() -> None:
    peak = matmul_peak()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
               "jax": jax.__version__, "devices": str(jax.devices()), "matmul_peak_flops_per_second": peak,
               "runs": []}
    for name, steps in (("tiny", 10), ("small", 4)):
        run = bench_config(name, steps)
        run["mfu"] = run["achieved_flops_per_second"] / peak
        results["runs"].append(run)
        print(json.dumps(run, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_train.json").write_text(json.dumps(results, indent=2))
    print(f"peak {peak / 1e9:.1f} GFLOP/s; wrote {RESULTS / 'bench_train.json'}")


if __name__ == "__main__":
    main()
