"""Training throughput on this machine: tokens/s, model FLOPs per token, MFU, and bfloat16 against float32.

    python experiments/bench_train.py        (make bench)

For configs/tiny.py and configs/small.py: compiles the real train step in the config's float32 and in
bfloat16 compute (params stay float32), times the two alternately after a warm-up (median per step), and
divides the model's FLOP/s (analytic, deepseek_jax/model/flops.py) by a matmul peak measured in the same
run (a large jnp.dot, in float32 and in bfloat16). XLA's own count is taken from the program with its layer
loops unrolled (`scan_layers=False`; XLA's cost analysis counts a loop body once) and set beside the
analytic count: it includes what the analytic one leaves out (the experts' padding rows, the masked
attention blocks of the diagonal, recomputation under remat='deepseek', elementwise work).
Writes experiments/results/bench_train.{json,md}.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import statistics
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


def matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 10) -> float:
    """Achieved FLOP/s of a large matmul in `dtype` (float32 accumulation): this machine's practical peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


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

    def compile_step(model_cfg):
        step = jax.jit(functools.partial(step_lib.train_step, cfg=model_cfg, train_cfg=config.train, tx=tx))
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        return compiled, time.perf_counter() - start

    programs = {dtype: compile_step(cfg.replace(dtype=dtype)) for dtype in ("float32", "bfloat16")}
    flops = float(compile_step(cfg.replace(scan_layers=False))[0].cost_analysis().get("flops", float("nan")))
    times = {dtype: [] for dtype in programs}
    for compiled, _ in programs.values():
        jax.block_until_ready(compiled(state, batch))  # Warm-up.
    for _ in range(steps):
        for dtype, (compiled, _) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, batch))
            times[dtype].append(time.perf_counter() - start)
    seconds = {dtype: statistics.median(t) for dtype, t in times.items()}
    tokens = config.data.batch_size * config.data.seq_len
    model_flops = training_flops_per_token(cfg, config.data.seq_len)
    return {
        "config": f"configs/{name}.py", "batch": config.data.batch_size, "seq_len": config.data.seq_len,
        "remat": cfg.remat, "params": count_params(cfg), "compile_seconds": programs["float32"][1],
        "seconds_per_step": seconds["float32"], "tokens_per_second": tokens / seconds["float32"],
        "bfloat16_seconds_per_step": seconds["bfloat16"], "bfloat16_tokens_per_second": tokens / seconds["bfloat16"],
        "xla_flops_per_token": flops / tokens, "model_flops_per_token": model_flops,
        "xla_over_model_flops": flops / tokens / model_flops,
        "achieved_flops_per_second": model_flops * tokens / seconds["float32"],
    }


def main() -> None:
    peak, peak_bf16 = matmul_peak(), matmul_peak(jnp.bfloat16)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
               "jax": jax.__version__, "devices": str(jax.devices()), "load_average_before": os.getloadavg(),
               "matmul_peak_flops_per_second": peak, "bfloat16_matmul_peak_flops_per_second": peak_bf16, "runs": []}
    for name, steps in (("tiny", 10), ("small", 4)):
        run = bench_config(name, steps)
        run["mfu"] = run["achieved_flops_per_second"] / peak
        results["runs"].append(run)
        print(json.dumps(run, indent=1), flush=True)
    results["load_average_after"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_train.json").write_text(json.dumps(results, indent=2))
    lines = ["# Training throughput on this CPU", "",
             f"Generated by `experiments/bench_train.py` ({results['machine']}, jax {results['jax']}); matmul peak "
             f"(2048^3, one jnp.dot): float32 {peak / 1e9:.0f} GFLOP/s, bfloat16 {peak_bf16 / 1e9:.0f} GFLOP/s.", "",
             "| config | remat | tokens/s (float32) | MFU | tokens/s (bfloat16 compute) | bf16 / f32 | "
             "XLA FLOPs / analytic FLOPs per token |", "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        lines.append(f"| {run['config']} ({run['batch']} x {run['seq_len']}) | {run['remat']} | "
                     f"{run['tokens_per_second']:,.0f} | {run['mfu']:.1%} | {run['bfloat16_tokens_per_second']:,.0f} | "
                     f"{run['bfloat16_tokens_per_second'] / run['tokens_per_second']:.2f}x | "
                     f"{run['xla_over_model_flops']:.2f}x |")
    (RESULTS / "bench_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
