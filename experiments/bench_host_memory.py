"""deepseek_jax's train step with its host-memory settings (deepseek_jax/host_memory.py) and without them.

configs/tiny.py's train step (random weights, its batch of 8 x 256, with and without MTP) in fresh processes
that alternate between DEEPSEEK_JAX_KEEP_FREED_MEMORY=1 and =0 over --rounds rounds. Each records the median
step time over 12 steps after a warm-up, the minor page faults per step (getrusage: a count, free of the
machine's noise) and the process's user and system CPU time over those steps. The ratio is the median over
rounds of the paired ratio (same round).

    python experiments/bench_host_memory.py [--rounds=3]
        -> experiments/results/bench_host_memory.json        (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time

from bench_vs_torch import run_json

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
STEPS = 12


def side(mtp: int) -> dict:
    """One process: the train step's median seconds, faults and CPU seconds per step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deepseek_jax import defaults, host_memory
    from deepseek_jax.model.config import ModelConfig
    from deepseek_jax.train import step as step_lib
    from deepseek_jax.train.optimizer import make_optimizer

    c = defaults.load_config(str(ROOT / "configs" / "tiny.py") + f":mtp={mtp}")
    cfg = ModelConfig.from_dict(c.model)
    B, T = c.data.batch_size, c.data.seq_len
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens.shape)}
    tx = make_optimizer(c.train)
    state = step_lib.init_state(cfg, tx, jax.random.key(0))
    train_step = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, train_cfg=c.train, tx=tx))
    jax.block_until_ready(train_step(state, batch))
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(STEPS):
        start = time.perf_counter()
        jax.block_until_ready(train_step(state, batch))
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"keep_freed_memory": host_memory.keep_freed_memory(), "step_seconds": statistics.median(times),
            "faults_per_step": (after.ru_minflt - before.ru_minflt) / STEPS,
            "user_seconds_per_step": (after.ru_utime - before.ru_utime) / STEPS,
            "system_seconds_per_step": (after.ru_stime - before.ru_stime) / STEPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side_mtp", type=int)  # internal: one side in this process
    args = parser.parse_args()
    if args.side_mtp is not None:
        print(json.dumps(side(args.side_mtp)))
        return
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "load_average_before": os.getloadavg()}, "rounds": args.rounds, "configs": {}}
    for mtp in (0, 1):
        rounds = []
        for r in range(args.rounds):
            record = {}
            for keep in ("1", "0"):
                os.environ["DEEPSEEK_JAX_KEEP_FREED_MEMORY"] = keep
                record["kept" if keep == "1" else "glibc"] = run_json([__file__, f"--side_mtp={mtp}"])
            rounds.append(record)
            print(f"tiny mtp={mtp} round {r}: kept {record['kept']['step_seconds'] * 1e3:.0f} ms "
                  f"({record['kept']['faults_per_step']:,.0f} faults/step), glibc "
                  f"{record['glibc']['step_seconds'] * 1e3:.0f} ms ({record['glibc']['faults_per_step']:,.0f})",
                  flush=True)
        speedups = [r["glibc"]["step_seconds"] / r["kept"]["step_seconds"] for r in rounds]
        out["configs"][f"tiny mtp={mtp}"] = {"rounds": rounds, "speedup_median": statistics.median(speedups),
                                             "speedups": speedups}
    out["machine"]["load_average_after"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_host_memory.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: (v["speedup_median"], v["speedups"]) for k, v in out["configs"].items()}))


if __name__ == "__main__":
    sys.exit(main())
