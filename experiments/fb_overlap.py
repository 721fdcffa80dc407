"""The F&B overlap, timed: a DualPipe step with expert parallelism, its F&B pairs interleaved or not.

    python experiments/fb_overlap.py                           # 8 devices: stage=2 x expert=4
    python experiments/fb_overlap.py --stage=2 --expert=8 --microbatches=16 --seq_len=1024

With interleaving (`tables.build_plan(..., interleave_pairs=True)`, the trainer's default with an
'expert' axis) each pair's F and I are one computation, the stage's layers unrolled into it, so that each
half's all-to-alls (dispatch, combine and their backward) have the other half's matmuls beside them;
without, the forward phase runs F and the backward phase B, one after the other. Both variants compute
the same step (checked here: equal losses and updated parameters within 1e-5). On GPU or TPU XLA can run the
all-to-alls asynchronously, so the interleaved step should be faster by the exposed all-to-all time; CPU
XLA runs collectives synchronously, so on CPU (simulated devices sharing the cores) the ratio only shows
what the interleaving costs in lock-step ticks and unrolled layers. The model is configs/v3_layout.py's
tiny DeepSeek-V3 at the given width and length, in bf16 on accelerators.

Also counts, in the compiled interleaved program, the all-to-alls of the pair's computation and how many
have the other half's compute independent of them (parallel/pipeline/overlap.py).

Writes experiments/results/fb_overlap_<platform>.{json,md}. Needs stage x expert devices; on a host
with fewer accelerators it stops and says so (one GPU cannot run an expert all-to-all).
"""

import os

# Simulated devices for a CPU run (the flag only shapes the host platform; GPUs are used as they are).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

from deepseek_jax import defaults  # noqa: E402
from deepseek_jax.model.config import ModelConfig  # noqa: E402
from deepseek_jax.parallel import mesh as mesh_lib  # noqa: E402
from deepseek_jax.parallel.pipeline import execute, overlap  # noqa: E402
from deepseek_jax.parallel.pipeline.tables import Branch, Field  # noqa: E402
from deepseek_jax.train import pipelined  # noqa: E402
from deepseek_jax.train import step as step_lib  # noqa: E402
from deepseek_jax.train.optimizer import make_optimizer  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", str(ROOT / "experiments" / "results"), "Where to write the results.")
_STAGE = flags.DEFINE_integer("stage", 2, "Pipeline ranks.")
_EXPERT = flags.DEFINE_integer("expert", 4, "Expert-parallel devices per rank.")
_MICRO = flags.DEFINE_integer("microbatches", 8, "Micro-batches (DualPipe: a multiple of 2 x stage).")
_ROWS = flags.DEFINE_integer("rows_per_microbatch", 4, "Rows per micro-batch (a multiple of --expert).")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_HIDDEN = flags.DEFINE_integer("hidden_size", 256, "Model width D (the tiny model's by default).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per variant after one warm-up; medians kept.")


def _config():
    config = defaults.load_config(str(ROOT / "configs" / "v3_layout.py"))
    config.parallel.update(stage=_STAGE.value, data=1, expert=_EXPERT.value, microbatches=_MICRO.value,
                           node_limit=0)
    config.model.update(hidden_size=_HIDDEN.value, moe_dispatch="ep",
                        dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")
    config.data.update(seq_len=_SEQ.value, batch_size=_MICRO.value * _ROWS.value)
    return config


def _time(fn, *args) -> list[float]:
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def main(argv) -> None:
    del argv
    devices = _STAGE.value * _EXPERT.value
    if jax.device_count() < devices:
        raise SystemExit(f"stage {_STAGE.value} x expert {_EXPERT.value} needs {devices} devices; this host has "
                         f"{jax.device_count()} {jax.default_backend()} device(s). An expert all-to-all needs "
                         "several accelerators: run it on a multi-GPU host (or on CPU with simulated devices).")
    config = _config()
    cfg = ModelConfig.from_dict(config.model)
    tx = make_optimizer(config.train)
    mesh = mesh_lib.make_mesh(config.parallel)
    state = step_lib.init_state(cfg, tx, jax.random.key(0))
    B, T = config.data.batch_size, config.data.seq_len
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens.shape)}
    result = {"machine": {"platform": jax.default_backend(), "devices": f"{jax.device_count()} x "
                          f"{jax.devices()[0].device_kind}", "host": f"{platform.machine()}, {os.cpu_count()} cores",
                          "jax": jax.__version__},
              "layout": dict(stage=_STAGE.value, expert=_EXPERT.value, microbatches=_MICRO.value, rows=B, seq_len=T,
                             hidden_size=cfg.hidden_size, dtype=cfg.dtype, moe_layers=cfg.num_moe_layers),
              "variants": {}}
    outputs = {}
    for interleave in (False, True):
        plan = pipelined.make_plan("dualpipe", _STAGE.value, _MICRO.value, _EXPERT.value, interleave)
        step = functools.partial(pipelined.pipelined_train_step, cfg=cfg, train_cfg=config.train, tx=tx, plan=plan,
                                 mesh=mesh)
        with jax.set_mesh(mesh):
            started = time.perf_counter()
            compiled = jax.jit(step).lower(state, batch).compile()
            compile_seconds = time.perf_counter() - started
            times = _time(compiled, state, batch)
            outputs[interleave] = compiled(state, batch)
        pairs = int(np.sum(plan.table[:, :, Field.F_BRANCH] == Branch.PAIR))
        row = {"ticks": plan.num_ticks, "interleaved_pairs": pairs,
               "compile_seconds": round(compile_seconds, 2), "step_seconds": times,
               "median_step_seconds": statistics.median(times)}
        if interleave:
            found = overlap.pair_all_to_alls(overlap.computations(compiled.as_text()), execute.PAIR_FORWARD,
                                             execute.PAIR_INPUT_GRAD)
            row["pair_all_to_alls"] = len(found)
            row["pair_all_to_alls_beside_other_half"] = sum(1 for a in found if a.independent_compute)
            row["pair_all_to_alls_in_pair_computation"] = sum(1 for a in found if a.via is None)
        result["variants"]["interleaved" if interleave else "sequential"] = row
        print(f"{'interleaved' if interleave else 'sequential'}: {row}", flush=True)
    (s0, m0), (s1, m1) = outputs[False], outputs[True]
    same_params = all(np.allclose(a, b, rtol=1e-5, atol=1e-6)
                      for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)))
    result["same_step"] = bool(np.allclose(m0["loss"], m1["loss"], rtol=1e-5) and same_params)
    v = result["variants"]
    result["speedup"] = v["sequential"]["median_step_seconds"] / v["interleaved"]["median_step_seconds"]
    out = pathlib.Path(_OUT_DIR.value)
    out.mkdir(parents=True, exist_ok=True)
    name = f"fb_overlap_{jax.default_backend()}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    md = [f"# F&B overlap, timed ({result['machine']['devices']}, jax {jax.__version__})", "",
          "Generated by `experiments/fb_overlap.py`: the pipelined DualPipe step of configs/v3_layout.py's model "
          f"(D = {cfg.hidden_size}, {cfg.dtype}), stage {_STAGE.value} x expert {_EXPERT.value}, {_MICRO.value} "
          f"micro-batches of {_ROWS.value} x {T} tokens; median of {_STEPS.value} steps after a warm-up.", "",
          "| F&B pairs | ticks | interleaved pairs | compile s | median step s |", "|---|---|---|---|---|"]
    for k, r in v.items():
        md.append(f"| {k} | {r['ticks']} | {r['interleaved_pairs']} | {r['compile_seconds']} | "
                  f"{r['median_step_seconds']:.4f} |")
    md += ["", f"Sequential / interleaved step time: {result['speedup']:.3f}x; same loss and updated parameters: "
           f"{result['same_step']}. "
           f"All-to-alls of the pair's computation: {v['interleaved']['pair_all_to_alls']} "
           f"({v['interleaved']['pair_all_to_alls_in_pair_computation']} in it directly, the rest in the head's "
           f"conditional), {v['interleaved']['pair_all_to_alls_beside_other_half']} with compute of the other half "
           "independent of them."]
    if jax.default_backend() == "cpu":
        md += ["", "CPU XLA runs collectives synchronously and the simulated devices share the host's cores: this "
               "ratio is the cost of the interleaved plan's lock-step ticks and unrolled layers, not a measure of "
               "overlap. Run it on a multi-GPU host for that."]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    app.run(main)
