"""deepseek_jax (jit) vs transformers 5 (PyTorch eager, CPU) on the same configs and the same weights.

For each config a random DeepseekV3ForCausalLM is built with transformers and saved; one subprocess runs it
in PyTorch (loaded with `from_pretrained`, transformers' default sdpa attention and grouped_mm experts, no
torch.compile), another imports it with `deepseek_jax.convert.load_checkpoint` and runs it under jax.jit.
Separate processes, one after the other, so neither framework's thread pool competes with the other's.
deepseek_jax runs with its default MoE dispatch ('ragged': sort + lax.ragged_dot) and with the 'dense'
reference (every expert on every token). Measured: forward tokens/s (no grad) and forward+backward tokens/s
of the mean next-token cross-entropy (gradients w.r.t. all parameters). The logits of both sides are
compared as a sanity check. The MTP module is not run (transformers' forward has none).

Configs: `tiny` is configs/tiny.py; `small` is defined here (configs/small.py does not exist yet):
hidden 512, 8 layers (1 dense + 7 MoE), 16 experts (top-4 of 4 groups, 2 kept), vocabulary 4096.

    python experiments/bench_vs_torch.py   # -> experiments/results/bench_vs_torch.json (~5 min on 2 cores)
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "bench_vs_torch.json"
SMALL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
             num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128,
             qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=1,
             num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
             rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096, rms_norm_eps=1e-6)
SHAPES = {"tiny": (8, 128), "small": (4, 256)}  # (batch, sequence length): 1024 tokens per step.
MIN_SECONDS, MIN_STEPS = 2.0, 2
SIDES = ("torch", "jax_ragged", "jax_dense")  # deepseek_jax with its default (ragged) and reference MoE dispatch.


def timed(step, sync=lambda x: x) -> dict:
    """Runs `step` once (compile / warm-up), then for >= MIN_SECONDS; returns the timing record."""
    start = time.perf_counter()
    sync(step())
    first = time.perf_counter() - start
    steps, start = 0, time.perf_counter()
    while steps < MIN_STEPS or time.perf_counter() - start < MIN_SECONDS:
        sync(step())
        steps += 1
    return dict(seconds_per_step=(time.perf_counter() - start) / steps, first_call_s=round(first, 2), steps=steps)


def tokens_for(name: str, vocab: int) -> np.ndarray:
    batch, length = SHAPES[name]
    return np.random.default_rng(0).integers(0, vocab, (batch, length))


def build(name: str, path: pathlib.Path) -> None:
    """A random transformers model of config `name`, saved to `path`."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from deepseek_jax import defaults

    if name == "tiny":
        m = dict(defaults.load_config(str(ROOT / "configs" / "tiny.py")).model)
        for key in ("dtype", "moe_dispatch", "remat", "topk_method", "scoring_func", "num_nextn_predict_layers"):
            m.pop(key)
    else:
        m = dict(SMALL)
    assert m.pop("rope_scaling") is None
    cfg = transformers.DeepseekV3Config(**m, num_key_value_heads=m["num_attention_heads"], num_nextn_predict_layers=0,
                                        rope_parameters=dict(rope_type="default", rope_theta=m.pop("rope_theta")))
    torch.manual_seed(0)
    hf_model = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # A random balancing bias so that routing is not trivially uniform.
        for layer in hf_model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.01)
    hf_model.save_pretrained(path)


def run_torch(name: str, path: pathlib.Path) -> dict:
    import torch
    import transformers

    hf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(str(path)).eval()
    tokens = torch.as_tensor(tokens_for(name, hf_model.config.vocab_size))

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

    np.save(path / "torch_logits.npy", forward().numpy())
    return dict(forward=timed(forward), forward_backward=timed(forward_backward), threads=torch.get_num_threads(),
                params=sum(p.numel() for p in hf_model.parameters()),
                attn_implementation=hf_model.config._attn_implementation,
                experts_implementation=getattr(hf_model.config, "_experts_implementation", None),
                version=torch.__version__, transformers=transformers.__version__)


def run_jax(name: str, path: pathlib.Path, dispatch: str) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    import optax

    from deepseek_jax import convert, model

    cfg, variables = convert.load_checkpoint(str(path))
    cfg = cfg.replace(moe_dispatch=dispatch)
    tokens = jnp.asarray(tokens_for(name, cfg.vocab_size), jnp.int32)
    forward = jax.jit(lambda v, t: model.forward(cfg, v, t))

    def loss(v, t):
        logits = model.forward(cfg, v, t)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss))
    record = dict(forward=timed(lambda: forward(variables, tokens), jax.block_until_ready),
                  forward_backward=timed(lambda: step(variables, tokens), jax.block_until_ready),
                  moe_dispatch=cfg.moe_dispatch, version=jax.__version__, devices=str(jax.devices()))
    np.save(path / f"jax_{dispatch}_logits.npy", np.asarray(forward(variables, tokens)))
    return record


def main() -> None:
    out = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
               note="Same weights on both sides, float32, CPU, one process per side. torch: eager (no "
                    "torch.compile), transformers' default implementations. jax: jit. tokens_per_s excludes the "
                    "first call (jit compile / torch warm-up), which is reported as first_call_s. The machine is "
                    "shared: load_average_before/after (1, 5, 15 min) say how busy it was.")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tiny", "small"):
            path = pathlib.Path(tmp) / name
            build(name, path)
            entry = dict(batch=SHAPES[name][0], length=SHAPES[name][1])
            n = entry["batch"] * entry["length"]
            entry["load_average_before"] = os.getloadavg()
            for side in SIDES:
                stdout = subprocess.run([sys.executable, __file__, "--side", side, name, str(path)], check=True,
                                        capture_output=True, text=True, cwd=ROOT).stdout
                record = json.loads(stdout.strip().splitlines()[-1])
                for kind in ("forward", "forward_backward"):
                    record[kind]["tokens_per_s"] = round(n / record[kind].pop("seconds_per_step"), 1)
                    print(f"{name:6s} {side:10s} {kind:17s} {record[kind]['tokens_per_s']:9.0f} tok/s "
                          f"(first call {record[kind]['first_call_s']:.1f} s)", flush=True)
                entry[side] = record
            entry["load_average_after"] = os.getloadavg()
            for side in SIDES[1:]:
                entry[side]["logits_max_abs_diff_vs_torch"] = float(np.abs(
                    np.load(path / "torch_logits.npy") - np.load(path / f"{side}_logits.npy")).max())
                entry[side]["speedup_vs_torch"] = {
                    k: round(entry[side][k]["tokens_per_s"] / entry["torch"][k]["tokens_per_s"], 2)
                    for k in ("forward", "forward_backward")}
            out[name] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--side":
        side, name, path = sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4])
        print(json.dumps(run_torch(name, path) if side == "torch" else run_jax(name, path, side.split("_")[1])))
    else:
        main()
