"""deepseek_jax's train step under each host-memory setting of deepseek_jax/host_memory.py.

The train step of configs/tiny.py (with and without MTP) and configs/small.py (without), random weights,
their own batch shapes, in fresh processes that alternate over --rounds rounds between three settings:

    glibc        glibc's defaults (GLIBC_TUNABLES without hugetlb, DEEPSEEK_JAX_KEEP_FREED_MEMORY=0)
    huge_pages   GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (what the `python -m deepseek_jax...` mains run with)
    kept         DEEPSEEK_JAX_KEEP_FREED_MEMORY=1 (opt-in), without huge pages

Each records the median step time over the steps after a warm-up, the minor page faults per step (getrusage:
a count, free of the machine's noise) and the process's user and system CPU time per step. Each speedup is
the median over rounds of the paired ratio to `glibc` (same round).

    python experiments/bench_host_memory.py [--rounds=3]
        -> experiments/results/bench_host_memory.json        (about 30 minutes on 2 cores)
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
STEPS = {"tiny": 12, "small": 4}
CASES = (("tiny", 0), ("tiny", 1), ("small", 0))
SETTINGS = ("glibc", "huge_pages", "kept")


def side(name: str, mtp: int) -> dict:
    """One process: the train step's median seconds, faults and CPU seconds per step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deepseek_jax import defaults, host_memory
    from deepseek_jax.model.config import ModelConfig
    from deepseek_jax.train import step as step_lib
    from deepseek_jax.train.optimizer import make_optimizer

    c = defaults.load_config(str(ROOT / "configs" / f"{name}.py") + f":mtp={mtp}")
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
    for _ in range(STEPS[name]):
        start = time.perf_counter()
        jax.block_until_ready(train_step(state, batch))
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    steps = STEPS[name]
    return {"keep_freed_memory": host_memory.keep_freed_memory(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "step_seconds": statistics.median(times),
            "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "user_seconds_per_step": (after.ru_utime - before.ru_utime) / steps,
            "system_seconds_per_step": (after.ru_stime - before.ru_stime) / steps}


def environment(setting: str) -> dict:
    """os.environ for a side under `setting` (module docstring)."""
    from deepseek_jax import host_memory

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.ENV)}
    env[host_memory.ENV] = "1" if setting == "kept" else "0"
    if setting == "huge_pages":
        tunables = host_memory.huge_pages_tunables({})
        if tunables is None:
            raise SystemExit("huge pages change nothing here (not glibc >= 2.35, or transparent huge pages "
                             f"not in 'madvise' mode: {host_memory.thp_mode()}): nothing to measure")
        env["GLIBC_TUNABLES"] = tunables
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side", nargs=2)  # internal: one side in this process (config name, mtp)
    args = parser.parse_args()
    if args.side is not None:
        print(json.dumps(side(args.side[0], int(args.side[1]))))
        return
    sys.path.insert(0, str(ROOT))
    from deepseek_jax import host_memory

    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "libc": platform.libc_ver(),
                       "transparent_huge_pages": host_memory.thp_mode(), "load_average_before": os.getloadavg()},
           "rounds": args.rounds, "configs": {}}
    for name, mtp in CASES:
        rounds = []
        for r in range(args.rounds):
            record = {setting: run_json([__file__, "--side", name, str(mtp)], environment(setting))
                      for setting in SETTINGS}
            rounds.append(record)
            print(f"{name} mtp={mtp} round {r}: " + ", ".join(
                f"{s} {record[s]['step_seconds'] * 1e3:.0f} ms ({record[s]['faults_per_step']:,.0f} faults/step)"
                for s in SETTINGS), flush=True)
        speedups = {s: [r["glibc"]["step_seconds"] / r[s]["step_seconds"] for r in rounds] for s in SETTINGS[1:]}
        out["configs"][f"{name} mtp={mtp}"] = {
            "rounds": rounds, "speedup_median": {s: statistics.median(v) for s, v in speedups.items()},
            "speedups": speedups}
    out["machine"]["load_average_after"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_host_memory.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v["speedup_median"] for k, v in out["configs"].items()}))


if __name__ == "__main__":
    sys.exit(main())
