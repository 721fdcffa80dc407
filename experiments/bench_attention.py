"""The attention core alone: deepseek_jax's causal self-attention (XLA) vs PyTorch's scaled_dot_product_attention.

Is attention where the training step loses to transformers on this CPU? For configs/tiny.py and
configs/small.py (their batch, length, heads and head widths) both sides get the same random q
(already scaled), k and v and compute softmax(q k^T, causal) v: deepseek_jax with
`model.mla.causal_attention`, what every MLA layer runs in training (blocks of 128 queries, each against
the keys up to its last query), PyTorch with `scaled_dot_product_attention(is_causal=True)`, what
transformers' DeepseekV3 runs (attn_implementation='sdpa'). Measured per side: the forward, and the
forward plus the backward to q, k and v (one fixed output cotangent). Each side runs in its own
subprocess with bench_vs_torch.py's pinning (same CPUs, same number of compute threads) and its check
of other processes' CPU use; the sides alternate over --rounds rounds and each ratio is the median of
the rounds' paired ratios (valid rounds only). Outputs are compared as a sanity check.

    python experiments/bench_attention.py [--rounds=3] [--configs=tiny,small]
        -> experiments/results/bench_attention.json        (about 3 minutes on 2 cores)

The per-step figure multiplies the forward-plus-backward time by the config's layers: what the core
costs in one training step without MTP (under remat='deepseek' the core's output is kept and its
backward recomputes the probabilities, as the vjp here does).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile

import numpy as np
from bench_vs_torch import MAX_OTHER_CPU_SHARE, RESULTS, ROOT, _pin, run_config, run_json, timed

SIDES = ("jax", "torch")
MEASURES = ("forward", "fwd+bwd")


def shapes(name: str) -> dict:
    """B, T, H, K (query/key width: nope + rope), V and the layer count of configs/<name>.py."""
    model, _, (batch, length) = run_config(name)
    return dict(B=batch, T=length, H=model["num_attention_heads"],
                K=model["qk_nope_head_dim"] + model["qk_rope_head_dim"], V=model["v_head_dim"],
                layers=model["num_hidden_layers"])


def inputs(s: dict) -> tuple[np.ndarray, ...]:
    """float32 q [B,T,H,K] (scaled by K^-0.5), k [B,T,H,K], v and the output cotangent [B,T,H,V]."""
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((s["B"], s["T"], s["H"], s["K"]), np.float32) for _ in range(2))
    v, cotangent = (rng.standard_normal((s["B"], s["T"], s["H"], s["V"]), np.float32) for _ in range(2))
    return q * np.float32(s["K"] ** -0.5), k, v, cotangent


def jax_side(s: dict, threads: int, out_path: pathlib.Path) -> dict:
    _pin(threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp

    from deepseek_jax.model.mla import causal_attention

    q, k, v, cotangent = (jnp.asarray(a) for a in inputs(s))
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    forward = jax.jit(lambda q, k, v: causal_attention(q, k, v, segment_ids))
    backward = jax.jit(lambda q, k, v: jax.vjp(forward, q, k, v)[1](cotangent))
    np.save(out_path, np.asarray(forward(q, k, v)))
    return {"forward": timed(lambda: forward(q, k, v), jax.block_until_ready),
            "fwd+bwd": timed(lambda: backward(q, k, v), jax.block_until_ready), "version": jax.__version__}


def torch_side(s: dict, threads: int, out_path: pathlib.Path) -> dict:
    _pin(threads)
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    # [B,H,T,K]: the layout transformers hands to scaled_dot_product_attention.
    q, k, v, cotangent = (torch.as_tensor(a).transpose(1, 2).contiguous() for a in inputs(s))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    def forward():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        out.backward(cotangent)
        return out

    np.save(out_path, forward().transpose(1, 2).numpy())
    return {"forward": timed(forward, lambda x: x), "fwd+bwd": timed(forward_backward, lambda x: x),
            "version": torch.__version__}


def run_side(side: str, name: str, threads: int, out_path: pathlib.Path) -> dict:
    return run_json([__file__, "--side", side, "--config_name", name, "--threads", str(threads),
                     "--out", str(out_path)])


def benchmark(configs: list[str], rounds: int, threads: int) -> dict:
    out = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), threads=threads),
               rounds=rounds, max_other_cpu_share=MAX_OTHER_CPU_SHARE, configs={})
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            s = shapes(name)
            entry = dict(shapes=s, rounds=[])
            for r in range(rounds):
                record = {side: run_side(side, name, threads, pathlib.Path(tmp) / f"{side}.npy") for side in SIDES}
                for side in SIDES:
                    for measure in MEASURES:
                        m = record[side][measure]
                        m["valid"] = m["other_cpu_share"] <= MAX_OTHER_CPU_SHARE
                        print(f"round {r} {name:6s} {side:6s} {measure:8s} {m['seconds'] * 1e3:8.1f} ms "
                              f"(others used {m['other_cpu_share']:.1%} of the CPUs)", flush=True)
                entry["rounds"].append(record)
            entry["output_max_abs_diff"] = float(np.abs(np.load(pathlib.Path(tmp) / "jax.npy")
                                                        - np.load(pathlib.Path(tmp) / "torch.npy")).max())
            entry["summary"] = summarize(entry["rounds"], s["layers"])
            out["configs"][name] = entry
    return out


def summarize(rounds: list[dict], layers: int) -> dict:
    """Per measure: each side's median milliseconds, the median paired ratio torch / jax (> 1: XLA faster)
    over valid rounds, and the core's cost per training step (fwd+bwd x layers)."""
    summary = {}
    for measure in MEASURES:
        valid = [r for r in rounds if all(r[side][measure]["valid"] for side in SIDES)]
        summary[measure] = {
            **{f"{side}_ms": round(statistics.median(r[side][measure]["seconds"] for r in rounds) * 1e3, 2)
               for side in SIDES},
            "speedup_of_jax": (round(statistics.median(r["torch"][measure]["seconds"] / r["jax"][measure]["seconds"]
                                                       for r in valid), 3) if valid else None),
            "valid_rounds": len(valid)}
    summary["per_training_step_ms"] = {side: round(summary["fwd+bwd"][f"{side}_ms"] * layers, 1) for side in SIDES}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--side", choices=SIDES)  # internal: run one side in this process
    parser.add_argument("--config_name")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.side:
        side = jax_side if args.side == "jax" else torch_side
        print(json.dumps(side(shapes(args.config_name), args.threads, pathlib.Path(args.out))))
        return
    out = benchmark(args.configs.split(","), args.rounds, args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_attention.json").write_text(json.dumps(out, indent=2) + "\n")
    for name, entry in out["configs"].items():
        print(name, json.dumps(entry["summary"]), f"max |diff| {entry['output_max_abs_diff']:.1e}")


if __name__ == "__main__":
    main()
