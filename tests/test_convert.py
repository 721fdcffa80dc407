"""Imported Hugging Face checkpoints == transformers 5, layer by layer, with identical routing decisions.

Tiny random DeepseekV3ForCausalLM / DeepseekV2ForCausalLM models are built and saved with transformers
(with large enough weights and perturbed norms that mix-ups show), completed with what transformers drops
(the MTP layer `model.layers.{L}` with enorm/hnorm/eh_proj/shared_head and its embedding/head copies),
written as sharded safetensors, imported with `deepseek_jax.convert.load_checkpoint`, and run on random
tokens against the transformers model loaded from the same directory (eager attention, eager experts).
Helpers here are shared with test_convert_io.py.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)  # Tiny ops: torch's spinning thread pool fights XLA's for the cores (100x slower).

from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3  # noqa: E402
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_v32  # noqa: E402

from deepseek_jax import convert, model  # noqa: E402
from deepseek_jax.model.block import Block  # noqa: E402

TOL = 1e-4  # Max abs difference allowed in float32 (logits and hidden states are O(1)).
# Tiny graphs compile 4x faster without LLVM's expensive passes; numerics are unchanged (no fast math).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=32,
            beta_slow=1, mscale=1.0, mscale_all_dim=0.8)  # mscale != mscale_all_dim: cos/sin get scaled too.

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=256, rms_norm_eps=1e-6,
            initializer_range=0.1, routed_scaling_factor=2.5)

CASES = {
    # Released-V3-like: q latent, YaRN, group-limited routing with a random balancing bias, MTP layer, the
    # released config's lack of a rope_interleave key.
    "v3_qlora_yarn_mtp": dict(arch="v3", hf=dict(rope_parameters=YARN), bias=(0.0, 0.1), mtp=True,
                              drop_keys=("rope_interleave",)),
    # Full-rank queries, plain rope stored half-split (rope_interleave=False), 1 of 2 groups, and biases so
    # negative that every kept expert's selection score is < 0: filling masked groups with 0.0 instead of
    # -inf would pick experts from dropped groups.
    "v3_fullq_halfsplit_negbias": dict(arch="v3", hf=dict(q_lora_rank=None, rope_interleave=False, n_group=2,
                                                          topk_group=1, num_experts_per_tok=3),
                                       bias=(-2.0, 0.1), mtp=False),
    # FP8 weights with 128x128 block scales; hidden 160 and kv latent + rope = 138 give partial edge blocks.
    "v3_fp8_edge_blocks": dict(arch="v3", hf=dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=136,
                                                  q_lora_rank=144, kv_lora_rank=130, rope_parameters=YARN),
                               bias=(0.0, 0.1), mtp=True, fp8=True),
    # V2-Lite shaped: no q latent, softmax gate, greedy top-k, 2 shared experts, no bias, no MTP.
    "v2_lite": dict(arch="v2", hf=dict(q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=3, n_group=1,
                                       topk_group=1, topk_method="greedy", norm_topk_prob=False,
                                       routed_scaling_factor=1.0, rope_parameters=dict(YARN, mscale=0.707,
                                                                                       mscale_all_dim=0.707)),
                    bias=None, mtp=False),
    # DeepSeek-V3.2: every layer's MLA (the MTP layer's too) masked to the lightning indexer's top 4 keys of
    # up to 12 (test_dsa.py checks the selections themselves, and that this seed has no near-tie at the cut).
    "v32_sparse_attention": dict(arch="v32", hf=dict(index_n_heads=16, index_head_dim=16, index_topk=4),
                                 bias=(0.0, 0.1), mtp=True),
}
CLASSES = {"v3": (transformers.DeepseekV3Config, hf_v3.DeepseekV3ForCausalLM),
           "v32": (transformers.DeepseekV32Config, hf_v32.DeepseekV32ForCausalLM),
           "v2": (transformers.DeepseekV2Config, hf_v2.DeepseekV2ForCausalLM)}


# ------------------------------------------------------------------ building checkpoints with transformers


def hf_config(arch, **overrides):
    config_cls, _ = CLASSES[arch]
    values = dict(BASE, **overrides)
    if arch == "v2":
        values.pop("num_nextn_predict_layers", None)
    return config_cls(**values, attn_implementation="eager", experts_implementation="eager")


def write_checkpoint(root, tensors, config, shards=2):
    """tensors {name: torch tensor} as `shards` safetensors files + index + config.json (a dict)."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        safetensors.torch.save_file(part, str(root / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return root


def hf_state(hf_model, tmp):
    """The model's tensors under checkpoint names (per-expert weights), via save_pretrained."""
    hf_model.save_pretrained(tmp)
    out = {}
    for file in sorted(pathlib.Path(tmp).glob("*.safetensors")):
        out.update(safetensors.torch.load_file(str(file)))
    return out


def quantise_block(w, block=128):
    """DeepSeek's recipe block by block in NumPy: s = amax / 448, q = e4m3(w / s). Returns (q, s)."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    q, s = np.zeros(w.shape, ml_dtypes.float8_e4m3fn), np.zeros((rows, cols), np.float32)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s[i, j] = max(np.abs(tile).max() / np.float32(448), np.finfo(np.float32).tiny)
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s[i, j]).astype(q.dtype)
    return q, s


def quantise_fp8(tensors):
    """DeepSeek's release format: E4M3 with 128x128 block scales for every decoder-layer linear weight, the
    rest bfloat16 (routing biases float32). Returns (stored tensors, their float32 values)."""
    stored, dequantised = {}, {}
    for name, t in tensors.items():
        if not convert.hf_export.FP8_WEIGHTS.fullmatch(name):
            stored[name] = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
            dequantised[name] = stored[name].to(torch.float32)
            continue
        q, s = quantise_block(t.numpy())
        stored[name] = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
        stored[name + "_scale_inv"] = torch.from_numpy(s)
        # Dequantised independently of deepseek_jax (torch, per-element scales) for the transformers reference.
        scale = torch.from_numpy(s).repeat_interleave(128, 0)[:t.shape[0]].repeat_interleave(128, 1)[:, :t.shape[1]]
        dequantised[name] = stored[name].to(torch.float32) * scale
    return stored, dequantised


def build(case, tmp, seed=0):
    """Writes the case's checkpoint to tmp/'ckpt' (and an unquantised twin for transformers when FP8).

    Returns (checkpoint dir, transformers model loaded from the float32 twin, its config).
    """
    spec = CASES[case]
    arch, mtp = spec["arch"], spec["mtp"]
    torch.manual_seed(seed)
    cfg = hf_config(arch, **spec["hf"], **({"num_nextn_predict_layers": 1} if arch != "v2" else {}))
    L = cfg.num_hidden_layers
    big = CLASSES[arch][1](hf_config(arch, **{**spec["hf"], "num_hidden_layers": L + 1})).eval()
    with torch.no_grad():
        for name, p in big.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("norm.bias"):  # The indexer's key LayerNorm (V3.2).
                p.copy_(0.2 * torch.randn_like(p))
        if spec["bias"] is not None:
            for layer in big.model.layers[cfg.first_k_dense_replace:]:
                mean, std = spec["bias"]
                layer.mlp.gate.e_score_correction_bias.copy_(mean + std * torch.randn(cfg.n_routed_experts))
    tensors = hf_state(big, tmp / "big")
    layer = f"model.layers.{L}."
    if mtp:
        D = cfg.hidden_size
        tensors.update({layer + "enorm.weight": 1 + 0.2 * torch.randn(D),
                        layer + "hnorm.weight": 1 + 0.2 * torch.randn(D),
                        layer + "shared_head.norm.weight": 1 + 0.2 * torch.randn(D),
                        layer + "eh_proj.weight": 0.1 * torch.randn(D, 2 * D),
                        layer + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
                        layer + "shared_head.head.weight": tensors["lm_head.weight"].clone()})
    else:
        tensors = {n: t for n, t in tensors.items() if not n.startswith(layer)}
    config = json.loads(cfg.to_json_string())  # What save_pretrained writes.
    for key in spec.get("drop_keys", ()):
        config.pop(key, None)
    if arch != "v2" and not mtp:
        config["num_nextn_predict_layers"] = 0
    reference = tmp / "ckpt"
    if spec.get("fp8"):
        stored, tensors = quantise_fp8(tensors)
        write_checkpoint(tmp / "ckpt", stored, dict(config, quantization_config=dict(
            activation_scheme="dynamic", fmt="e4m3", quant_method="fp8", weight_block_size=[128, 128])))
        reference = tmp / "dequantised"
    write_checkpoint(reference, tensors, config)
    hf_model = CLASSES[arch][1].from_pretrained(str(reference), attn_implementation="eager",
                                                experts_implementation="eager").eval()
    return tmp / "ckpt", hf_model, cfg


_BUILT = {}  # Module-level: test_convert_io.py imports the fixture, which pytest then defines twice.


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Built once per case for the whole session: case -> (dir, transformers model, HF config)."""

    def get(case):
        if case not in _BUILT:
            _BUILT[case] = build(case, tmp_path_factory.mktemp(case))
        return _BUILT[case]

    return get


# ------------------------------------------------------------------ running both sides


def hf_outputs(hf_model, tokens):
    """transformers: logits [B,T,V], each layer's output [B,T,D], each MoE layer's selected experts [N,K]."""
    layers, routes = [], []
    hooks = [layer.register_forward_hook(lambda m, i, o: layers.append(o[0] if isinstance(o, tuple) else o))
             for layer in hf_model.model.layers]
    hooks += [layer.mlp.gate.register_forward_hook(lambda m, i, o: routes.append((o[1], o[2])))
              for layer in hf_model.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        out = hf_model(torch.as_tensor(tokens), output_hidden_states=True)
    for h in hooks:
        h.remove()
    to_np = lambda t: t.detach().numpy()  # noqa: E731
    return (to_np(out.logits), [to_np(h) for h in layers], [(to_np(w), to_np(i)) for w, i in routes],
            to_np(out.hidden_states[-1]))


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def our_outputs(cfg, variables, tokens):
    """Ours: the full model (logits, MTP logits) and, piecewise, each decoder layer's output and routing."""
    out = model.apply(cfg, variables, tokens)
    params, routing = variables["params"], variables["routing"]
    positions = model.transformer.default_positions(tokens)
    segments = jnp.ones_like(tokens)
    x = params["embed_tokens"]["embedding"][tokens]
    states, routes = [], []
    for stack, count in (("dense_layers", cfg.num_dense_layers), ("moe_layers", cfg.num_moe_layers)):
        for i in range(count):
            layer_vars = jax.tree.map(lambda a: a[i], {"params": params[stack], "routing": routing.get(stack, {})})
            (x, _), inter = Block(cfg, stack == "moe_layers").apply(
                layer_vars, x, positions, segments, capture_intermediates=True, mutable=["intermediates"])
            states.append(x)
            if stack == "moe_layers":
                weights, indices, _ = inter["intermediates"]["mlp"]["gate"]["__call__"][0]
                routes.append((weights, indices))
    return out.logits, out.mtp_logits, states, routes


def sorted_routes(weights, indices):
    order = np.argsort(indices, axis=-1)
    return np.take_along_axis(weights, order, -1), np.take_along_axis(indices, order, -1)


def tokens_for(cfg, seed=1, batch=2, length=12):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)


# ------------------------------------------------------------------ parity tests


@pytest.fixture(scope="session")
def runs(checkpoints):
    """Each case imported and run once on both sides: {case: dict of inputs and outputs}."""
    cache = {}

    def get(case):
        if case not in cache:
            path, hf_model, hf_cfg = checkpoints(case)
            cfg, variables = convert.load_checkpoint(str(path))
            tokens = tokens_for(cfg)
            cache[case] = dict(path=path, hf_model=hf_model, hf_cfg=hf_cfg, cfg=cfg, tokens=tokens,
                               hf=hf_outputs(hf_model, tokens),
                               ours=jax.device_get(our_outputs(cfg, variables, jnp.asarray(tokens))))
        return cache[case]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_hidden_states_and_routing_match_transformers(case, runs):
    run = runs(case)
    cfg, (hf_logits, hf_layers, hf_routes, _), (logits, _, layers, routes) = run["cfg"], run["hf"], run["ours"]
    assert len(layers) == len(hf_layers) == run["hf_cfg"].num_hidden_layers
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(layers, hf_layers)]
    logit_diff = float(np.max(np.abs(logits - hf_logits)))
    print(f"\n[parity] {case}: logits max|diff| {logit_diff:.2e} (max|logit| {np.abs(hf_logits).max():.2f}); "
          f"layers {[f'{d:.1e}' for d in diffs]} (max|h| {max(np.abs(h).max() for h in hf_layers):.1f})")
    assert logit_diff <= TOL and max(diffs) <= TOL
    assert len(routes) == len(hf_routes) == cfg.num_moe_layers
    for (w, i), (hf_w, hf_i) in zip(routes, hf_routes):
        ours_w, ours_i = sorted_routes(w, i)
        ref_w, ref_i = sorted_routes(hf_w, hf_i)
        np.testing.assert_array_equal(ours_i, ref_i)
        np.testing.assert_allclose(ours_w, ref_w, atol=1e-5)


def test_negative_bias_case_separates_inf_from_zero_fill(runs):
    """In that case, filling dropped groups with 0.0 (as DeepSeek's first HF remote code did) instead of -inf
    (DeepSeek's inference code, transformers 5, ours) picks different experts, so the parity test tells them apart."""
    run = runs("v3_fullq_halfsplit_negbias")
    hf_model, hf_cfg = run["hf_model"], run["hf_cfg"]
    gate = hf_model.model.layers[hf_cfg.first_k_dense_replace].mlp.gate
    inputs = []
    hook = gate.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    with torch.no_grad():
        hf_model(torch.as_tensor(run["tokens"]))
        hook.remove()
        x = inputs[0].reshape(-1, hf_cfg.hidden_size)
        choice = torch.sigmoid(x @ gate.weight.T) + gate.e_score_correction_bias
        assert bool((choice < 0).all())
        groups = choice.view(len(x), hf_cfg.n_group, -1).topk(2, dim=-1)[0].sum(-1)
        kept = torch.zeros_like(groups).scatter_(1, groups.topk(hf_cfg.topk_group, dim=-1)[1], 1)
        kept = kept.repeat_interleave(hf_cfg.n_routed_experts // hf_cfg.n_group, dim=1).bool()
        zero_fill = choice.masked_fill(~kept, 0.0).topk(hf_cfg.num_experts_per_tok, dim=-1)[1]
    _, inf_fill = run["hf"][2][0]
    assert not np.array_equal(np.sort(zero_fill.numpy(), -1), np.sort(inf_fill, -1))


def mtp_reference(path, hf_cfg, tokens, h0):
    """MTP depth 1 in float64 from the checkpoint's tensors: logits at positions 0..T-2 (predicting t_{i+2}).

    h' = eh_proj [enorm(Emb(t_{i+1})) ; hnorm(h0_i)],  h1 = shared_head.norm(Block(h')),  logits = head(h1),
    with Block transformers' own DeepseekV3DecoderLayer (MoE) in float64.
    """
    t = {}
    for file in sorted(pathlib.Path(path).glob("*.safetensors")):
        t.update({k: v.to(torch.float64) for k, v in safetensors.torch.load_file(str(file)).items()})
    L, eps = hf_cfg.num_hidden_layers, hf_cfg.rms_norm_eps
    p = f"model.layers.{L}."

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    emb = t["model.embed_tokens.weight"][torch.as_tensor(tokens[:, 1:]).long()]
    h = torch.as_tensor(np.asarray(h0, np.float64)[:, :-1])
    joined = torch.cat([rms(emb, t[p + "enorm.weight"]), rms(h, t[p + "hnorm.weight"])], dim=-1)
    x = joined @ t[p + "eh_proj.weight"].T
    block = hf_v3.DeepseekV3DecoderLayer(hf_cfg, layer_idx=L).double().eval()
    state = {n[len(p):]: v for n, v in t.items() if n.startswith(p)}
    E = hf_cfg.n_routed_experts
    state["mlp.experts.gate_up_proj"] = torch.stack([  # transformers 5 packs [gate; up] per expert.
        torch.cat([state.pop(f"mlp.experts.{e}.gate_proj.weight"), state.pop(f"mlp.experts.{e}.up_proj.weight")])
        for e in range(E)])
    state["mlp.experts.down_proj"] = torch.stack([state.pop(f"mlp.experts.{e}.down_proj.weight") for e in range(E)])
    extra = {k: state.pop(k) for k in list(state) if k.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head",
                                                                         "embed_tokens")}
    block.load_state_dict(state, strict=True)
    T = x.shape[1]
    positions = torch.arange(T)[None]
    cos, sin = hf_v3.DeepseekV3RotaryEmbedding(hf_cfg)(x, positions)
    mask = torch.full((T, T), -torch.inf, dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        y = block(x, attention_mask=mask, position_ids=positions, position_embeddings=(cos.double(), sin.double()))
        h1 = rms(y, extra["shared_head.norm.weight"])
        return (h1 @ t["lm_head.weight"].T).numpy(), (h1 @ extra["shared_head.head.weight"].T).numpy()


@pytest.mark.parametrize("case", ["v3_qlora_yarn_mtp", "v3_fp8_edge_blocks"])
def test_mtp_matches_float64_formula(case, runs):
    run = runs(case)
    cfg, tokens, hf_model, path = run["cfg"], run["tokens"], run["hf_model"], run["path"]
    assert cfg.num_nextn_predict_layers == 1
    # h0 in float64 from transformers' main model (final-normed hidden state, as the MTP module sees it).
    with torch.no_grad():
        h0 = hf_model.double()(torch.as_tensor(tokens), output_hidden_states=True).hidden_states[-1].numpy()
    hf_model.float()
    reference_path = path.parent / "dequantised" if CASES[case].get("fp8") else path
    want, want_copy = mtp_reference(reference_path, run["hf_cfg"], tokens, h0)
    np.testing.assert_array_equal(want, want_copy)  # The layer's head copy is the main head.
    got = run["ours"][1][0][:, :-1]  # Depth 1; the last position has no token i+1.
    diff = float(np.max(np.abs(got - want)))
    print(f"\n[mtp] {case}: max|diff| {diff:.2e} (max|logit| {np.abs(want).max():.2f})")
    assert diff <= TOL
