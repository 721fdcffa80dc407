"""Inference benchmarks: MLA latent-cache size, absorbed vs naive decode speed, MTP speculative decoding.

    python experiments/bench_infer.py [--workdir=runs/tiny] [--quick]

1. KV-cache bytes per token of DeepSeek-V2-Lite, DeepSeek-V2 (its shape, defined inline) and DeepSeek-V3,
   read from the cache pytree `infer.cache_shapes` allocates (jax.eval_shape: nothing is allocated),
   against caches of multi-head attention with the same heads and of GQA with 8 KV heads, built the
   same way; and the arithmetic behind DeepSeek-V2's "93.3% smaller KV cache".
2. Decode tokens/s of configs/small.py at context lengths 256..8192, batch 1: the jitted decode loop
   (absorbed MLA vs naive up-projection; and absorbed with W_UK / W_UV split from kv_b_proj's kernel on
   every step instead of once before the loop, `infer.cached.with_absorbed_weights`) timed over a few
   tokens from a cache filled to that length; and
   transformers' greedy decode loop with its cache (as `generate` runs it) on the same weights (exported with
   `convert.save_checkpoint`) at 256, 1024 and 4096, timed from the filled cache as ours is.
3. MTP self-speculative decoding with the trained tiny model (`make train` -> runs/tiny): acceptance rate
   of the drafted token and end-to-end tokens/s against plain greedy decoding, on held-out prompts; and
   what bounds it here, the cost of a step's passes against a plain step's (`pass_costs`).
4. DeepSeek Sparse Attention (V3.2): configs/small.py with a lightning indexer (4 heads of 64) attending to
   its top 256 keys, decode tokens/s at 1k-16k tokens of context against the same model's dense absorbed MLA
   (the weights without the indexer), the cache bytes per token (latent + rope key + indexer key), and the
   compiled forward's temporary memory at 8,192 tokens (`compiled.memory_analysis()`), sparse vs dense.

Writes experiments/results/bench_infer.json and bench_infer.png; `--sections=sparse` (say) runs only the
sections named and updates those entries of the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import convert, defaults, infer, model
from deepseek_jax.data import pipeline, tokenizers
from deepseek_jax.infer import cached, generation
from deepseek_jax.infer.sampling import Sampling
from deepseek_jax.infer.steps import DecodeState, Settings
from deepseek_jax.model import ModelConfig
from deepseek_jax.model import init as model_init
from deepseek_jax.model.mla import ABSORBED
from deepseek_jax.train.validation import validate_run_config
from deepseek_jax.train.weights import load_weights

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
SLOTS = 4096  # Cache length used to measure bytes per token (any length gives the same ratio).


def load_model_config(name: str, **overrides) -> ModelConfig:
    config = defaults.load_config(str(ROOT / "configs" / f"{name}.py"))
    return ModelConfig.from_dict(config.model).replace(**overrides)


def deepseek_v2() -> ModelConfig:
    """DeepSeek-V2 (236B): 60 layers, 128 heads, kv_lora 512, rope 64, nope 128, v 128 (its config.json)."""
    return load_model_config(
        "deepseek_v2_lite", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
        n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3, topk_method="group_limited_greedy",
        routed_scaling_factor=16.0)


def per_head_cache_bytes(layers: int, kv_heads: int, k_dim: int, v_dim: int, dtype) -> int:
    """Bytes per token of a standard per-head K/V cache, read from an eval_shape'd allocation like ours."""
    shapes = jax.eval_shape(lambda: {"k": jnp.zeros((layers, 1, SLOTS, kv_heads, k_dim), dtype),
                                     "v": jnp.zeros((layers, 1, SLOTS, kv_heads, v_dim), dtype)})
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(shapes)) // SLOTS


def kv_cache_sizes() -> dict:
    out = {}
    for name, cfg in (("deepseek_v2_lite", load_model_config("deepseek_v2_lite")), ("deepseek_v2", deepseek_v2()),
                      ("deepseek_v3", load_model_config("deepseek_v3"))):
        dtype = jnp.dtype(cfg.dtype)
        cache = infer.cache_shapes(cfg, 1, SLOTS)
        mla = infer.bytes_per_token(cache)
        L, H = cfg.num_hidden_layers, cfg.num_attention_heads
        baselines = {
            # What the naive path materialises per step, were it cached: per-head keys (nope + rope) and values.
            "mha_same_heads": per_head_cache_bytes(L, H, cfg.qk_head_dim, cfg.v_head_dim, dtype),
            # DeepSeek-V2 Table 1's MHA: 2 n_h d_h l elements with d_h = 128.
            "mha_dh128": per_head_cache_bytes(L, H, 128, 128, dtype),
            "gqa8_dh128": per_head_cache_bytes(L, 8, 128, 128, dtype),
        }
        out[name] = {
            "layers": L, "heads": H, "kv_lora_rank": cfg.kv_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "dtype": cfg.dtype,
            "cache_leaves": {f"{stack}.{field}": list(getattr(cache.layers[stack], field).shape)
                             for stack in cache.layers for field in ("c_kv", "k_rope")},
            "mla_elements_per_token": mla // dtype.itemsize,
            "mla_bytes_per_token": mla,
            **{f"{k}_bytes_per_token": v for k, v in baselines.items()},
            **{f"reduction_vs_{k}": 1 - mla / v for k, v in baselines.items()},
        }
    v2 = out["deepseek_v2"]
    # DeepSeek-V2's 93.3%: its baseline is DeepSeek 67B (95 layers, GQA with 8 KV heads of 128, BF16 cache),
    # and DeepSeek-V2's deployed cache is additionally quantised to ~6 bits per element on average.
    dense67b = per_head_cache_bytes(95, 8, 128, 128, jnp.bfloat16)
    out["deepseek_v2_paper_93_3_percent"] = {
        "baseline": "DeepSeek 67B: 95 layers x 8 KV heads (GQA) x 128 x (K,V), BF16",
        "baseline_bytes_per_token": dense67b,
        "v2_mla_bf16_bytes_per_token": v2["mla_bytes_per_token"],
        "v2_mla_6bit_bytes_per_token": v2["mla_elements_per_token"] * 6 / 8,
        "reduction_bf16": 1 - v2["mla_bytes_per_token"] / dense67b,
        "reduction_with_6bit_kv_quantisation": 1 - v2["mla_elements_per_token"] * 6 / 8 / dense67b,
    }
    return out


def state_at_context(cfg: ModelConfig, s: Settings, context: int) -> DecodeState:
    """A batch-1 decode state whose cache holds `context` (random) tokens: what a decode step sees then."""
    cache = infer.init_cache(cfg, 1, s.cache_size)
    leaves, tree = jax.tree.flatten(cache.layers)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    layers = jax.tree.unflatten(tree, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])
    one, zero = (lambda: jnp.ones((1,), jnp.int32)), (lambda: jnp.zeros((1,), jnp.int32))  # Distinct buffers:
    return DecodeState(                                                                     # the step donates.
        cache=infer.KVCache(layers, jnp.full((1,), context, jnp.int32)),
        tokens=jnp.zeros((1, 1 + s.max_new_tokens), jnp.int32), prompt_lengths=one(), num_generated=one(),
        done=jnp.zeros((1,), bool), last_token=zero(), drafts=jnp.zeros((1, 0), jnp.int32), draft_probs=None,
        stop_tokens=jnp.full((1,), -1, jnp.int32), sampling=Sampling.make(), key=jax.random.key(0),
        step=jnp.ones((), jnp.int32), drafted=zero(), accepted=zero())


TRANSFORMERS_CONTEXTS = (256, 1024, 4096)


def transformers_decode_speed(cfg: ModelConfig, variables: dict, contexts: list[int], steps: int) -> dict:
    """{context: tokens/s} of transformers' greedy decode loop with its cache (what `generate` runs after the
    prefill: the model's forward on one token with its DynamicCache, argmax) on the same weights, batch 1,
    from a random prompt of `context` tokens whose prefill is not timed; best of 2 after a warm-up."""
    import tempfile

    import torch
    import transformers

    with tempfile.TemporaryDirectory() as directory:
        convert.save_checkpoint(cfg, variables, directory)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    speeds = {}
    for context in contexts:
        prompt = torch.as_tensor(np.random.default_rng(context).integers(0, cfg.vocab_size, (1, context)))

        @torch.no_grad()
        def decode_seconds() -> float:
            out = model(prompt, use_cache=True)
            started = time.perf_counter()
            for _ in range(steps):
                token = out.logits[:, -1:].argmax(-1)
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
            return time.perf_counter() - started

        decode_seconds()  # Warm-up.
        speeds[context] = steps / min(decode_seconds() for _ in range(2))
    return {"tokens_per_second": speeds, "attention": model.config._attn_implementation,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__}


def decode_tokens_per_second(cfg: ModelConfig, variables: dict, context: int, steps: int,
                             attention: str = "absorbed") -> float:
    """The decode loop of `generate` (one program) for `steps` tokens from a cache at `context`, batch 1:
    best of 2 after a warm-up."""
    s = Settings(max_new_tokens=steps + 1, cache_size=context + steps + 1, attention=attention)
    jax.block_until_ready(generation.finish_jit(cfg, s, variables, state_at_context(cfg, s, context)))
    times = []
    for _ in range(2):
        state = jax.block_until_ready(state_at_context(cfg, s, context))
        started = time.perf_counter()
        jax.block_until_ready(generation.finish_jit(cfg, s, variables, state))
        times.append((time.perf_counter() - started) / steps)
    return 1.0 / min(times)


def decode_speed(contexts: list[int], steps: int) -> dict:
    cfg = load_model_config("small", max_position_embeddings=max(contexts) + steps + 2)
    variables = model_init(cfg, jax.random.key(0))
    rows = []
    for context in contexts:
        row = {"context": context}
        for attention in ("absorbed", "naive"):
            row[f"{attention}_tokens_per_second"] = decode_tokens_per_second(cfg, variables, context, steps, attention)
        row["absorbed_speedup"] = row["absorbed_tokens_per_second"] / row["naive_tokens_per_second"]
        # An empty collection is kept as it is: the loop then splits the kernels on every step (as before).
        row["absorbed_split_each_step_tokens_per_second"] = decode_tokens_per_second(
            cfg, {**variables, ABSORBED: {}}, context, steps)
        row["split_once_speedup"] = (row["absorbed_tokens_per_second"]
                                     / row["absorbed_split_each_step_tokens_per_second"])
        print(f"context {context:5d}: absorbed {row['absorbed_tokens_per_second']:7.1f} tok/s, naive "
              f"{row['naive_tokens_per_second']:7.1f} tok/s ({row['absorbed_speedup']:.2f}x); W_UK/W_UV split "
              f"every step {row['absorbed_split_each_step_tokens_per_second']:7.1f} tok/s (split once: "
              f"{row['split_once_speedup']:.2f}x)", flush=True)
        rows.append(row)
    # After ours: torch's OpenMP threads keep spinning for a while after its last op, taking the CPU.
    reference = transformers_decode_speed(cfg, variables, [c for c in contexts if c in TRANSFORMERS_CONTEXTS],
                                          steps)
    for row in rows:
        if row["context"] in reference["tokens_per_second"]:
            row["transformers_tokens_per_second"] = reference["tokens_per_second"][row["context"]]
            row["absorbed_vs_transformers"] = row["absorbed_tokens_per_second"] / row["transformers_tokens_per_second"]
            print(f"context {row['context']:5d}: transformers {row['transformers_tokens_per_second']:7.1f} "
                  f"tok/s (absorbed MLA {row['absorbed_vs_transformers']:.2f}x)", flush=True)
    return {"config": "configs/small.py", "batch": 1, "timed_steps": steps, "rows": rows,
            "transformers": {k: v for k, v in reference.items() if k != "tokens_per_second"}}


SPARSE = dict(index_n_heads=4, index_head_dim=64, index_topk=256)  # DSA on configs/small.py (section 4).


def without_indexer(cfg: ModelConfig, variables: dict) -> tuple[ModelConfig, dict]:
    """The same model with dense attention (V3): the config without the indexer, the variables without its
    leaves."""
    def drop(tree):
        return {k: drop(v) for k, v in tree.items() if k != "indexer"} if isinstance(tree, dict) else tree

    return cfg.dense_attention(), drop(variables)


def forward_temp_bytes(cfg: ModelConfig, variables: dict, length: int) -> int:
    """Temporary bytes of the compiled forward (main logits, batch 1) at `length` tokens."""
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    compiled = jax.jit(lambda v, t: model.apply(cfg, v, t, run_mtp=False).logits).lower(variables, tokens).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def sparse_attention(contexts: list[int], steps: int, memory_length: int) -> dict:
    cfg = load_model_config("small", max_position_embeddings=max(contexts + [memory_length]) + steps + 2,
                            **SPARSE)
    variables = model_init(cfg, jax.random.key(0))
    dense_cfg, dense_variables = without_indexer(cfg, variables)
    rows = []
    for context in contexts:
        runs = {"sparse": [], "dense": []}
        for _ in range(2):  # Alternately, so both see the same machine.
            runs["sparse"].append(decode_tokens_per_second(cfg, variables, context, steps))
            runs["dense"].append(decode_tokens_per_second(dense_cfg, dense_variables, context, steps))
        row = {"context": context, **{f"{name}_tokens_per_second": max(v) for name, v in runs.items()}}
        row["sparse_speedup"] = row["sparse_tokens_per_second"] / row["dense_tokens_per_second"]
        print(f"context {context:5d}: DSA (top {cfg.index_topk}) {row['sparse_tokens_per_second']:7.1f} tok/s, dense "
              f"{row['dense_tokens_per_second']:7.1f} tok/s ({row['sparse_speedup']:.2f}x)", flush=True)
        rows.append(row)
    memory = {"tokens": memory_length, "sparse_temp_bytes": forward_temp_bytes(cfg, variables, memory_length),
              "dense_temp_bytes": forward_temp_bytes(dense_cfg, dense_variables, memory_length)}
    print(f"forward at {memory_length} tokens: temporaries {memory['sparse_temp_bytes'] / 2**20:.1f} MiB sparse, "
          f"{memory['dense_temp_bytes'] / 2**20:.1f} MiB dense", flush=True)
    bytes_per_token = {name: infer.bytes_per_token(infer.cache_shapes(c, 1, 1))
                       for name, c in (("sparse", cfg), ("dense", dense_cfg))}
    return {"config": "configs/small.py", **SPARSE, "batch": 1, "timed_steps": steps, "rows": rows,
            "forward_memory": memory, "cache_bytes_per_token": bytes_per_token}


def held_out_prompts(config, count: int, length: int) -> np.ndarray:
    """The first `length` tokens of the first `count` validation documents long enough."""
    tokenizer = tokenizers.make_tokenizer(config.data)
    docs = [d for d in pipeline.load_corpus(config.data).validation if len(d) >= length]
    if len(docs) < count:
        raise ValueError(f"only {len(docs)} validation documents have {length} bytes; lower the prompt length.")
    return np.stack([tokenizer.encode(d)[:length] for d in docs[:count]]).astype(np.int32)


def timed_alternately(*functions, repeats: int = 7) -> tuple[list, list[float]]:
    """Best-of-`repeats` seconds of each function, run in turn (so all see the same machine load), after
    one call each (compiling). Returns (each one's last result, its best seconds)."""
    results = [fn() for fn in functions]  # Compile.
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for i, fn in enumerate(functions):
            started = time.perf_counter()
            results[i] = fn()
            best[i] = min(best[i], time.perf_counter() - started)
    return results, best


def pass_costs(cfg: ModelConfig, variables: dict, prompt_1T: np.ndarray, passes: int = 64, repeats: int = 7) -> dict:
    """Seconds per pass of what one speculative step runs, batch 1, from the cache after the prompt, each
    pass in a jitted loop of `passes` (`timed_alternately`: best of `repeats`): the main model over 1 token
    (a plain step's pass) and over J = D + 1 (the verify pass), and each MTP depth over J (the draft passes).
    A step emits at most J tokens, so J x main(1) / (main(J) + the MTP passes) bounds the speed-up over plain
    decoding on this machine (all drafts accepted, the verify's own bookkeeping free)."""
    s, *arrays = generation.prepare(cfg, prompt_1T, max_new_tokens=passes, speculative=True)
    cache = generation.start_jit(cfg, s, variables, *arrays).cache
    looped = generation.loop_variables_jit(cfg, s, variables)
    D = cfg.num_nextn_predict_layers
    J = D + 1

    def loop(one_pass, width: int):
        """`passes` passes, each fed the previous one's cache, argmax tokens and hidden state (so that no
        pass is hoisted out of the loop, and no part of one is left unused)."""
        def run(v, c):
            def body(_, carry):
                cache, tokens, h = carry
                logits, h, cache = one_pass(v, cache, tokens, h)
                return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32), h

            first = (c, jnp.zeros((1, width), jnp.int32), jnp.zeros((1, width, cfg.hidden_size), jnp.float32))
            return jax.lax.fori_loop(0, passes, body, first)
        return jax.jit(run)

    programs = {"main_1": loop(lambda v, c, t, h: cached.extend(cfg, v, c, t), 1),
                f"main_{J}": loop(lambda v, c, t, h: cached.extend(cfg, v, c, t), J)}
    for k in range(D):
        programs[f"mtp{k}_{J}"] = loop(lambda v, c, t, h, k=k: cached.extend_mtp(cfg, v, c, k, h, t), J)
    _, seconds = timed_alternately(*(lambda p=p: jax.block_until_ready(p(looped, cache)) for p in programs.values()),
                                   repeats=repeats)
    best = {name: t / passes for name, t in zip(programs, seconds)}
    step = sum(t for name, t in best.items() if name != "main_1")
    return {"seconds_per_pass": best, "step_over_plain_pass": step / best["main_1"],
            "speedup_bound": J * best["main_1"] / step}


def speculative_decoding(workdir: str, prompts: int, prompt_length: int, new_tokens: int) -> dict:
    config = defaults.load_config(str(ROOT / "configs" / "tiny.py"))
    weights = load_weights(workdir, validate_run_config(config), optimizer_cfg=config.train)
    cfg, variables, step = weights.cfg, weights.variables, weights.step
    if step < config.train.steps:
        print(f"warning: {workdir} holds step {step} of {config.train.steps}: a partly trained model drafts "
              "worse.")
    prompt = held_out_prompts(config, prompts, prompt_length)
    out = {"workdir": workdir, "step": step, "trained_steps": config.train.steps, "mtp_depth":
           cfg.num_nextn_predict_layers, "prompt_tokens": prompt_length, "new_tokens": new_tokens, "runs": []}
    # Each prompt alone (batch 1: one weak prompt does not speak for all), then all of them as one batch.
    for first, batch in [(b, 1) for b in range(prompts)] + [(0, prompts)]:
        rows = prompt[first:first + batch]
        (plain, spec), (t_plain, t_spec) = timed_alternately(
            lambda: infer.decode(cfg, variables, rows, max_new_tokens=new_tokens),
            lambda: infer.decode(cfg, variables, rows, max_new_tokens=new_tokens, speculative=True))
        assert np.array_equal(plain.tokens, spec.tokens), "speculative greedy output differs from plain greedy"
        generated = int(plain.num_generated.sum())
        # A row's passes: its prefill, then one verify per step it was active (each drafted D tokens).
        row_passes = batch + int(spec.drafted.sum()) // cfg.num_nextn_predict_layers
        run = {"batch": batch, "first_prompt": first, "acceptance_rate": spec.acceptance_rate,
               "tokens_per_forward_pass": generated / row_passes, "batch_forward_passes": spec.forward_passes,
               "plain_seconds": t_plain, "speculative_seconds": t_spec,
               "plain_tokens_per_second": generated / t_plain, "speculative_tokens_per_second": generated / t_spec,
               "speedup": t_plain / t_spec, "identical_to_greedy": True}
        print(f"speculative, prompt{'s' if batch > 1 else ''} {first}..{first + batch - 1}: acceptance "
              f"{run['acceptance_rate']:.1%}, {run['tokens_per_forward_pass']:.2f} tokens/pass, "
              f"{run['plain_tokens_per_second']:.1f} -> {run['speculative_tokens_per_second']:.1f} tok/s "
              f"({run['speedup']:.2f}x)", flush=True)
        out["runs"].append(run)
    # What bounds the speed-up: the tiny model's passes, and configs/small.py's (random weights: only the
    # costs matter there) at 256 tokens of context, to see whether a larger model changes the picture.
    small = load_model_config("small")
    context = np.random.default_rng(0).integers(0, small.vocab_size, (1, 256)).astype(np.int32)
    for key, costs in (("pass_costs", pass_costs(cfg, variables, prompt[:1])),
                       ("pass_costs_small", pass_costs(small, model_init(small, jax.random.key(0)), context,
                                                       passes=16, repeats=5))):
        out[key] = costs
        print(f"speculative, {key}: " + ", ".join(f"{k} {1e6 * v:.0f} us" for k, v in
              costs["seconds_per_pass"].items()) + f"; a step costs {costs['step_over_plain_pass']:.2f} plain "
              f"passes: at most {costs['speedup_bound']:.2f}x", flush=True)
    alone = [r for r in out["runs"] if r["batch"] == 1]
    out["batch_1_all_prompts_speedup"] = (sum(r["plain_seconds"] for r in alone)
                                          / sum(r["speculative_seconds"] for r in alone))
    print(f"speculative, batch 1 over all {prompts} prompts: {out['batch_1_all_prompts_speedup']:.2f}x", flush=True)
    return out


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    rows = result["decode_speed"]["rows"]
    ctx = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for attention in ("absorbed", "naive"):
        ax.plot(ctx, [r[f"{attention}_tokens_per_second"] for r in rows], marker="o", label=f"{attention} MLA")
    measured = [r for r in rows if "transformers_tokens_per_second" in r]
    ax.plot([r["context"] for r in measured], [r["transformers_tokens_per_second"] for r in measured], marker="s",
            label="transformers, cached decode")
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens in the cache)", ylabel="decode tokens/s",
           title="configs/small.py, batch 1, CPU")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(ctx, [str(c) for c in ctx])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


SECTIONS = ("cache", "decode", "speculative", "sparse")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/tiny", help="A run of configs/tiny.py (make train).")
    parser.add_argument("--quick", action="store_true", help="Fewer contexts and tokens (a smoke run).")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="Comma-separated sections to run (the others keep their entries of the JSON).")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}.")
    contexts = [256, 1024] if args.quick else [256, 512, 1024, 2048, 4096, 8192]
    path = RESULTS / "bench_infer.json"
    result = json.loads(path.read_text()) if path.is_file() and sections != set(SECTIONS) else {}
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
               "devices": [str(d) for d in jax.devices()]}
    if "cache" in sections:
        result["kv_cache"] = kv_cache_sizes()
        for name in ("deepseek_v2_lite", "deepseek_v2", "deepseek_v3"):
            r = result["kv_cache"][name]
            print(f"{name}: MLA {r['mla_bytes_per_token']:,} B/token vs MHA {r['mha_same_heads_bytes_per_token']:,} "
                  f"({r['reduction_vs_mha_same_heads']:.1%} less), GQA-8 {r['gqa8_dh128_bytes_per_token']:,} "
                  f"({r['reduction_vs_gqa8_dh128']:.1%} less)", flush=True)
    timed = {"decode": ("decode_speed", lambda: decode_speed(contexts, steps=4 if args.quick else 8)),
             "speculative": ("speculative", lambda: speculative_decoding(
                 args.workdir, prompts=8, prompt_length=64, new_tokens=32 if args.quick else 128)),
             "sparse": ("sparse_attention", lambda: sparse_attention(
                 [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384], steps=4 if args.quick else 32,
                 memory_length=2048 if args.quick else 8192))}
    for section, (key, run) in timed.items():
        if section in sections:
            before = os.getloadavg()
            result[key] = run()
            result[key]["machine"] = {**machine, "load_average_before": before, "load_average_after": os.getloadavg()}
    result["notes"] = (
        "CPU, float32. Decode speed: batch 1, the while-loop program of generate; the cache holds `context` "
        "tokens. Speculative: greedy, outputs asserted identical to plain decoding; tokens_per_forward_pass "
        "is the speedup a memory-bound accelerator would see (verifying 2 tokens costs about 1 pass there). "
        "Sparse attention: random weights (speed and memory do not depend on them); each section records the "
        "machine and its load averages.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    if "decode_speed" in result:
        plot(result, RESULTS / "bench_infer.png")
    print(f"Wrote {path} and bench_infer.png.")


if __name__ == "__main__":
    main()
