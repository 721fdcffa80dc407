"""deepseek_jax (jit) vs transformers (PyTorch eager, CPU) on the same configs and the same weights.

For configs/tiny.py and configs/small.py (their model and their batch shape: 8 x 256 and 8 x 512 tokens) a
random DeepseekV3ForCausalLM is built with transformers and saved; deepseek_jax imports it with
`deepseek_jax.convert.load_checkpoint`. Each side runs in its own subprocess, pinned to the same CPUs with
the same number of compute threads (torch: set_num_threads / one inter-op thread; XLA: its Eigen pool over
the same CPUs), and measures, after a warm-up (jit compile / torch's first call):

    forward       logits, no gradient
    fwd+bwd       gradients of the mean next-token cross-entropy w.r.t. every parameter
    train step    fwd+bwd, global-norm clipping at 1.0 and an AdamW update (deepseek_jax: its own
                  `train_step`, which also updates the routing biases; torch: clip_grad_norm_ and
                  torch.optim.AdamW with the same betas, eps and weight decay)

without the MTP module on either side (transformers' forward has none), and deepseek_jax's train step
with MTP as a separate row. deepseek_jax runs its default MoE dispatch ('ragged': sort by expert and
grouped GEMMs, blocked on CPU). Both sides run under the glibc tunables deepseek_jax's mains run with
(deepseek_jax/host_memory.py: huge pages for malloc; an ad-hoc check found PyTorch's train step no faster
and no slower with them, docs/DESIGN.md "CPU speed").
Honesty measures: while a side runs, the CPU time used by every other
process is read from /proc (the machine's busy jiffies minus the side's own) and a run where it exceeds
10% of the CPUs is marked invalid; the sides alternate over --rounds rounds (fresh processes each
round), and each ratio is the median over rounds of the paired ratio (same round). The logits of the
two sides are compared as a sanity check.

    python experiments/bench_vs_torch.py [--rounds=3] [--configs=tiny,small]
        -> experiments/results/bench_vs_torch.{json,md}        (about 15 minutes on 2 cores)

`--profile` instead profiles one train step of each config on each side (XLA's per-op timings sorted
into the step's parts by experiments/step_profile.py; PyTorch's profiler by operator) and writes
experiments/results/step_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
MEASURES = ("forward", "fwd+bwd", "train step")
SIDES = ("torch", "jax", "jax_mtp")  # jax_mtp: deepseek_jax's train step with its MTP module.
MIN_SECONDS, MIN_STEPS, MAX_STEPS = 3.0, 3, 20
MAX_OTHER_CPU_SHARE = 0.10  # Of all CPUs, used by other processes while a side ran: above it, invalid.


# -- measurement helpers (run inside each side's subprocess) ------------------------------------------


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat)."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _own_jiffies() -> int:
    """User + system jiffies of this process (all its threads) and its waited-for children."""
    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15])


class CpuWatch:
    """The share of all CPUs that other processes used between `start` and `stop`."""

    def start(self) -> None:
        self.busy, self.total = _busy_jiffies()
        self.own = _own_jiffies()

    def stop(self) -> float:
        busy, total = _busy_jiffies()
        own = _own_jiffies()
        return max(busy - self.busy - (own - self.own), 0) / max(total - self.total, 1)


def timed(step, sync) -> dict:
    """Warms `step` up once, then runs it for >= MIN_SECONDS (MIN_STEPS..MAX_STEPS times): the median
    seconds per call and the other processes' CPU share meanwhile."""
    start = time.perf_counter()
    sync(step())
    first = time.perf_counter() - start
    watch, times = CpuWatch(), []
    watch.start()
    begin = time.perf_counter()
    while len(times) < MIN_STEPS or (time.perf_counter() - begin < MIN_SECONDS and len(times) < MAX_STEPS):
        start = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - start)
    return dict(seconds=statistics.median(times), calls=len(times), first_call_s=round(first, 2),
                other_cpu_share=round(watch.stop(), 4))


def _pin(threads: int) -> None:
    """Both sides: the same CPUs, `threads` compute threads."""
    os.sched_setaffinity(0, range(threads))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)


def run_config(name: str) -> tuple[dict, dict, tuple[int, int]]:
    """(HF config kwargs, train settings, (batch, length)) of configs/<name>.py without MTP."""
    sys.path.insert(0, str(ROOT))
    from deepseek_jax import defaults

    c = defaults.load_config(str(ROOT / "configs" / f"{name}.py") + ":mtp=0")
    m = dict(c.model)
    for key in ("dtype", "moe_dispatch", "remat", "topk_method", "scoring_func", "num_nextn_predict_layers"):
        m.pop(key)
    train = {k: c.train[k] for k in ("learning_rate", "b1", "b2", "eps", "weight_decay", "clip_norm")}
    return m, train, (c.data.batch_size, c.data.seq_len)


def build(name: str, path: pathlib.Path) -> None:
    """A random transformers model of configs/<name>.py, saved to `path`."""
    import torch
    import transformers

    m, _, _ = run_config(name)
    assert m.pop("rope_scaling") is None
    cfg = transformers.DeepseekV3Config(**m, num_key_value_heads=m["num_attention_heads"], num_nextn_predict_layers=0,
                                        rope_parameters=dict(rope_type="default", rope_theta=m.pop("rope_theta")))
    torch.manual_seed(0)
    hf_model = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # A random balancing bias so that routing is not trivially uniform.
        for layer in hf_model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.01)
    hf_model.save_pretrained(path)


def tokens_for(name: str, vocab: int) -> np.ndarray:
    _, _, (batch, length) = run_config(name)
    return np.random.default_rng(0).integers(0, vocab, (batch, length))


def torch_side(name: str, path: pathlib.Path, threads: int, profile: bool) -> dict:
    _pin(threads)
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    _, train, _ = run_config(name)
    hf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(str(path))
    tokens = torch.as_tensor(tokens_for(name, hf_model.config.vocab_size))
    opt = torch.optim.AdamW(hf_model.parameters(), lr=train["learning_rate"], betas=(train["b1"], train["b2"]),
                            eps=train["eps"], weight_decay=train["weight_decay"])

    def forward():
        with torch.no_grad():
            return hf_model(tokens).logits

    def forward_backward():
        hf_model.zero_grad(set_to_none=True)
        logits = hf_model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        return loss

    def train_step():
        loss = forward_backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), train["clip_norm"])
        opt.step()
        return loss

    if profile:
        return torch_profile(train_step)
    hf_model.eval()
    logits = forward().numpy()
    np.save(path / "torch_logits.npy", logits)
    hf_model.train()
    record = {"forward": timed(forward, lambda x: x), "fwd+bwd": timed(forward_backward, lambda x: x),
              "train step": timed(train_step, lambda x: x)}
    return dict(record, threads=torch.get_num_threads(), version=torch.__version__,
                transformers=transformers.__version__, attn_implementation=hf_model.config._attn_implementation,
                experts_implementation=getattr(hf_model.config, "_experts_implementation", None))


TORCH_CATEGORIES = [  # (category, operator-name fragments), first match wins
    ("expert GEMMs", ("grouped_mm",)),
    ("attention", ("scaled_dot_product", "flash_attention", "softmax")),
    ("dense GEMMs", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("expert dispatch", ("sort", "index", "scatter", "gather", "histc", "bincount", "cumsum", "nonzero", "where")),
    ("router / gate", ("topk", "sigmoid")),
    ("head + loss", ("cross_entropy", "log_softmax", "nll_loss")),
    ("optimizer", ("adam", "foreach", "norm", "clip", "lerp", "addcdiv", "addcmul")),
]


def torch_profile(train_step) -> dict:
    """Self CPU time of one train step by operator (after two warm-up steps), sorted into parts."""
    import torch

    train_step()
    train_step()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step()
    wall = time.perf_counter() - start
    by_category, by_op = {}, {}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        by_op[event.key] = by_op.get(event.key, 0.0) + seconds
        category = next((c for c, keys in TORCH_CATEGORIES if any(k in event.key for k in keys)),
                        "norms / elementwise / other")
        by_category[category] = by_category.get(category, 0.0) + seconds
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:15]
    return {"wall_seconds": wall, "seconds_by_category": by_category, "top_operators": top}


def jax_side(name: str, path: pathlib.Path, threads: int, mtp: bool, profile: bool) -> dict:
    _pin(threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    from deepseek_jax import convert, defaults, model
    from deepseek_jax.model.config import ModelConfig
    from deepseek_jax.train import step as step_lib
    from deepseek_jax.train.optimizer import make_optimizer

    c = defaults.load_config(str(ROOT / "configs" / f"{name}.py") + f":mtp={int(mtp)}")
    cfg, variables = convert.load_checkpoint(str(path))
    if mtp:  # The imported weights plus a freshly initialised MTP module.
        cfg = ModelConfig.from_dict(c.model)
        fresh = model.init(cfg, jax.random.key(0))
        variables = {"params": {**fresh["params"], **variables["params"]},
                     "routing": {**fresh["routing"], **variables["routing"]}}
    cfg = cfg.replace(moe_dispatch=c.model.moe_dispatch, remat=c.model.remat)
    tokens = jnp.asarray(tokens_for(name, cfg.vocab_size), jnp.int32)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)}
    tx = make_optimizer(c.train)
    state = step_lib.state_from_variables(variables, tx)
    train_step = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, train_cfg=c.train, tx=tx))
    if profile:
        import step_profile

        compiled = train_step.lower(state, batch).compile()
        jax.block_until_ready(compiled(state, batch))
        result = step_profile.profile_compiled(compiled, lambda: compiled(state, batch), steps=3)
        return {"wall_seconds": result.wall_seconds, "busy_seconds": result.busy_seconds,
                "host_overhead_seconds": result.host_overhead_seconds,
                "seconds_by_category": result.seconds_by_category, "top_instructions": result.top_instructions,
                "layout_copy_seconds": result.layout_copy_seconds}
    record = {"train step": timed(lambda: train_step(state, batch), jax.block_until_ready)}
    if not mtp:
        forward = jax.jit(lambda v, t: model.forward(cfg, v, t))

        def loss(v, t):
            logits = model.forward(cfg, v, t)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).mean()

        grads = jax.jit(jax.value_and_grad(loss))
        np.save(path / "jax_logits.npy", np.asarray(forward(variables, tokens)))
        record = {"forward": timed(lambda: forward(variables, tokens), jax.block_until_ready),
                  "fwd+bwd": timed(lambda: grads(variables, tokens), jax.block_until_ready), **record}
    return dict(record, moe_dispatch=cfg.moe_dispatch, version=jax.__version__)


def run_json(arguments: list[str], environ: dict | None = None) -> dict:
    """Runs `python <arguments>` (a side, in a fresh process, in `environ` or this one's) with experiments/
    and the project importable: the JSON object its stdout ends with."""
    env = dict(os.environ if environ is None else environ, PYTHONPATH=f"{ROOT / 'experiments'}:{ROOT}")
    done = subprocess.run([sys.executable, *arguments], check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_side(side: str, name: str, path: pathlib.Path, threads: int, profile: bool = False) -> dict:
    return run_json([__file__, "--side", side, "--config_name", name, "--path", str(path), "--threads", str(threads)]
                    + (["--profile"] if profile else []))


# -- the two modes -------------------------------------------------------------------------------------


def use_mains_allocator_settings() -> str:
    """Sets this process's environment, which the sides inherit, to the glibc tunables deepseek_jax's mains
    run with (host_memory.py: huge pages). Returns GLIBC_TUNABLES."""
    sys.path.insert(0, str(ROOT))
    from deepseek_jax import host_memory

    return host_memory.huge_pages_for_new_processes(os.environ)


def benchmark(configs: list[str], rounds: int, threads: int) -> dict:
    out = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), threads=threads,
                            processor=platform.processor(), glibc_tunables=use_mains_allocator_settings()),
               rounds=rounds, max_other_cpu_share=MAX_OTHER_CPU_SHARE, configs={})
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            path = pathlib.Path(tmp) / name
            build(name, path)
            _, _, (batch, length) = run_config(name)
            entry = {"batch": batch, "length": length, "rounds": []}
            for r in range(rounds):
                record = {}
                for side in SIDES:
                    record[side] = run_side(side, name, path, threads)
                    for measure in MEASURES:
                        if measure in record[side]:
                            m = record[side][measure]
                            m["tokens_per_s"] = round(batch * length / m["seconds"], 1)
                            m["valid"] = m["other_cpu_share"] <= MAX_OTHER_CPU_SHARE
                            print(f"round {r} {name:6s} {side:8s} {measure:10s} {m['tokens_per_s']:9.0f} tok/s "
                                  f"(others used {m['other_cpu_share']:.1%} of the CPUs)", flush=True)
                entry["rounds"].append(record)
            entry["logits_max_abs_diff"] = float(np.abs(np.load(path / "torch_logits.npy")
                                                        - np.load(path / "jax_logits.npy")).max())
            entry["summary"] = summarize(entry["rounds"])
            out["configs"][name] = entry
    return out


def summarize(rounds: list[dict]) -> dict:
    """Per side and measure: median tokens/s over rounds, and the median over valid rounds of the paired
    ratio to torch's same measure (for jax_mtp's train step: torch's train step, which has no MTP)."""
    summary = {}
    for side in SIDES:
        for measure in MEASURES:
            runs = [r for r in rounds if measure in r[side]]
            if not runs:
                continue
            valid = [r for r in runs if r[side][measure]["valid"] and r["torch"][measure]["valid"]]
            summary[f"{side} / {measure}"] = {
                "tokens_per_s": statistics.median(r[side][measure]["tokens_per_s"] for r in runs),
                "ratio_to_torch": (statistics.median(r[side][measure]["tokens_per_s"]
                                                     / r["torch"][measure]["tokens_per_s"] for r in valid)
                                   if valid else None),
                "valid_rounds": len(valid), "rounds": len(runs)}
    return summary


def markdown(out: dict) -> str:
    lines = ["# deepseek_jax vs transformers (PyTorch eager) on this CPU", "",
             f"Generated by `experiments/bench_vs_torch.py`: {out['machine']['cpus']} CPUs "
             f"({out['machine']['processor'] or 'x86_64'}), {out['machine']['threads']} compute threads per side, "
             f"float32, {out['rounds']} alternating rounds; tokens/s are medians over rounds, ratios the median "
             "of each round's paired ratio (invalid rounds, where other processes used more than "
             f"{out['max_other_cpu_share']:.0%} of the CPUs, left out of the ratio).", "",
             "| config | measure | transformers tok/s | deepseek_jax tok/s | ratio | valid rounds |",
             "|---|---|---|---|---|---|"]
    for name, entry in out["configs"].items():
        s = entry["summary"]
        for side, label in (("jax", ""), ("jax_mtp", " (ours with MTP)")):
            for measure in MEASURES:
                key = f"{side} / {measure}"
                if key not in s:
                    continue
                ratio = s[key]["ratio_to_torch"]
                shown = "invalid" if ratio is None else f"{ratio:.2f}x"
                lines.append(f"| {name} ({entry['batch']} x {entry['length']}) | {measure}{label} | "
                             f"{s[f'torch / {measure}']['tokens_per_s']:,.0f} | {s[key]['tokens_per_s']:,.0f} | "
                             f"{shown} | "
                             f"{s[key]['valid_rounds']}/{s[key]['rounds']} |")
    lines += ["", "Logits, max |difference| between the sides: " + ", ".join(
        f"{n} {e['logits_max_abs_diff']:.1e}" for n, e in out["configs"].items()) + "."]
    return "\n".join(lines) + "\n"


def profile_all(configs: list[str], threads: int) -> dict:
    out = {"machine": dict(platform=platform.platform(), cpus=os.cpu_count(), threads=threads,
                           glibc_tunables=use_mains_allocator_settings()), "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            path = pathlib.Path(tmp) / name
            build(name, path)
            out["configs"][name] = {side: run_side(side, name, path, threads, profile=True)
                                    for side in ("torch", "jax", "jax_mtp")}
    return out


def profile_markdown(out: dict) -> str:
    lines = ["# Where the time of one training step goes (this CPU)", "",
             "Generated by `experiments/bench_vs_torch.py --profile`. deepseek_jax: XLA's per-instruction timings "
             "(jax.profiler) sorted into the step's parts by experiments/step_profile.py, summed over the "
             "executor's threads; host overhead = wall time minus the time any executor thread was busy. "
             "transformers: PyTorch's profiler, self CPU time per operator, sorted by operator name "
             "(matmuls of the attention projections, dense MLPs and shared experts are all 'dense GEMMs').", ""]
    for name, sides in out["configs"].items():
        lines += [f"## {name}", "", "| part | deepseek_jax ms | share | with MTP ms | transformers ms | share |",
                  "|---|---|---|---|---|---|"]
        jax_total = sum(sides["jax"]["seconds_by_category"].values())
        torch_total = sum(sides["torch"]["seconds_by_category"].values())
        parts = list(sides["jax"]["seconds_by_category"]) + [
            c for c in sides["torch"]["seconds_by_category"] if c not in sides["jax"]["seconds_by_category"]]
        for part in parts:
            j = sides["jax"]["seconds_by_category"].get(part)
            m = sides["jax_mtp"]["seconds_by_category"].get(part)
            t = sides["torch"]["seconds_by_category"].get(part)
            cell = lambda v, total: ("", "") if v is None else (f"{v * 1e3:,.1f}", f"{v / total:.0%}")  # noqa: E731
            lines.append(f"| {part} | {cell(j, jax_total)[0]} | {cell(j, jax_total)[1]} | {cell(m, 1)[0]} | "
                         f"{cell(t, torch_total)[0]} | {cell(t, torch_total)[1]} |")
        lines += [f"| wall time of the step | {sides['jax']['wall_seconds'] * 1e3:,.0f} | | "
                  f"{sides['jax_mtp']['wall_seconds'] * 1e3:,.0f} | {sides['torch']['wall_seconds'] * 1e3:,.0f} | |",
                  f"| host overhead | {sides['jax']['host_overhead_seconds'] * 1e3:,.1f} | | "
                  f"{sides['jax_mtp']['host_overhead_seconds'] * 1e3:,.1f} | | |", "",
                  "Of deepseek_jax's time (no MTP), instructions that materialise a transpose or a copy, mostly a "
                  "GEMM operand put into the layout the GEMM wants, with the elementwise work fused into them "
                  f"(counted in the parts above too): {sides['jax']['layout_copy_seconds'] * 1e3:,.1f} ms, "
                  f"{sides['jax']['layout_copy_seconds'] / jax_total:.0%}.", "",
                  "Slowest XLA instructions (deepseek_jax, no MTP): " + "; ".join(
                      f"{n} ({c}) {s * 1e3:.1f} ms" for n, c, s in sides["jax"]["top_instructions"][:8]) + ".", "",
                  "Slowest PyTorch operators: " + "; ".join(
                      f"{n} {s * 1e3:.1f} ms" for n, s in sides["torch"]["top_operators"][:8]) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--side", choices=SIDES)  # internal: run one side in this process
    parser.add_argument("--config_name")
    parser.add_argument("--path")
    args = parser.parse_args()
    if args.side:
        path = pathlib.Path(args.path)
        if args.side == "torch":
            result = torch_side(args.config_name, path, args.threads, args.profile)
        else:
            result = jax_side(args.config_name, path, args.threads, args.side == "jax_mtp", args.profile)
        print(json.dumps(result))
        return
    configs = args.configs.split(",")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.profile:
        out = profile_all(configs, args.threads)
        (RESULTS / "step_profile.json").write_text(json.dumps(out, indent=2) + "\n")
        (RESULTS / "step_profile.md").write_text(profile_markdown(out))
        print(profile_markdown(out))
        return
    out = benchmark(configs, args.rounds, args.threads)
    (RESULTS / "bench_vs_torch.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "bench_vs_torch.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
