"""Checkpoint conversion beyond parity: exact round trips, export parity, bad input, sharded placement, CLI.

Uses the checkpoints built by test_convert.py (transformers-made, session-cached).
"""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import ROOT, model_config

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import safetensors.torch  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from test_convert import CLASSES, FAST_COMPILE, checkpoints, quantise_block, tokens_for  # noqa: E402, F401  (checkpoints is a fixture)

from deepseek_jax import convert, model  # noqa: E402
from deepseek_jax.convert.safetensors_io import CheckpointFiles  # noqa: E402


def all_tensors(path):
    out = {}
    for file in sorted(pathlib.Path(path).glob("*.safetensors")):
        out.update(safetensors.torch.load_file(str(file)))
    return out


def assert_identical(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def hf_logits(path, arch, tokens):
    hf = CLASSES[arch][1].from_pretrained(str(path), attn_implementation="eager",
                                          experts_implementation="eager").eval()
    with torch.no_grad():
        return hf(torch.as_tensor(tokens)).logits.numpy()


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("case, dtype", [("v3_qlora_yarn_mtp", "float32"), ("v3_fullq_halfsplit_negbias", "float32"),
                                         ("v2_lite", "float32"), ("v3_fp8_edge_blocks", "float8_e4m3fn"),
                                         ("v32_sparse_attention", "float32")])
def test_round_trip_is_tensor_for_tensor_identical(case, dtype, checkpoints, tmp_path):
    path, hf_model, hf_cfg = checkpoints(case)
    cfg, variables = convert.load_checkpoint(str(path))
    base = json.loads((path / "config.json").read_text())
    convert.save_checkpoint(cfg, variables, str(tmp_path), dtype=dtype, base_config=base, max_shard_bytes=200_000)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_identical(all_tensors(path), all_tensors(tmp_path))
    exported = json.loads((tmp_path / "config.json").read_text())
    assert convert.from_hf(exported) == convert.from_hf(base)
    if case in ("v3_qlora_yarn_mtp", "v2_lite", "v32_sparse_attention"):  # transformers reads the export as
        tokens = tokens_for(cfg)  # it read the original.
        with torch.no_grad():
            want = hf_model(torch.as_tensor(tokens)).logits.numpy()
        np.testing.assert_array_equal(hf_logits(tmp_path, case.split("_")[0], tokens), want)


def test_export_of_a_fresh_model_matches_transformers(tmp_path):
    """Export direction: our own random tiny model, written out and run by transformers, gives our logits.
    (No base config: the released style, with YaRN in `rope_scaling`, which transformers 5 must translate.)"""
    yarn = dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                mscale=1.0, mscale_all_dim=0.8)
    cfg = model_config(hidden_size=64, num_nextn_predict_layers=1, rope_scaling=yarn)
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map_with_path(  # Random weights, norms near 1, biases ~ 0.1.
        lambda p, s: (rng.normal(1.0 if "scale" in jax.tree_util.keystr(p) else 0.0,
                                 0.1 if "norm" in jax.tree_util.keystr(p) or "bias" in jax.tree_util.keystr(p)
                                 else 0.1, s.shape)).astype(np.float32), model.abstract_variables(cfg))
    convert.save_checkpoint(cfg, variables, str(tmp_path))
    tokens = tokens_for(cfg)
    ours = jax.jit(model.forward, static_argnums=0, compiler_options=FAST_COMPILE)(cfg, variables, jnp.asarray(tokens))
    diff = np.abs(np.asarray(ours) - hf_logits(tmp_path, "v3", tokens)).max()
    assert diff <= 1e-4, diff
    back_cfg, back = convert.load_checkpoint(str(tmp_path))
    assert back_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, back, variables)


@pytest.mark.parametrize("origin", ["divide", "multiply"])
def test_quantize_exact_reproduces_fp8_blocks(origin):
    """Weights dequantised from FP8 re-quantise to the same bytes whichever way the scale was rounded."""
    w = np.random.default_rng(0).standard_normal((300, 260)).astype(np.float32) * 0.03
    if origin == "divide":
        q, s = quantise_block(w)
    else:
        q, s = (np.asarray(a) for a in convert.hf_export.fp8_quant.quantize_blockwise_2d(jnp.asarray(w)))
    dequantised = np.asarray(convert.hf_export.fp8_quant.dequantize_blockwise_2d(q, s))
    q2, s2 = convert.quantize_exact(dequantised, 128)
    np.testing.assert_array_equal(s2, s)
    np.testing.assert_array_equal(q2.view(np.uint8), np.asarray(q).view(np.uint8))
    q3, s3 = convert.quantize_exact(w, 128)  # Not from FP8: the plain quantiser's answer.
    np.testing.assert_array_equal(q3.view(np.uint8), np.asarray(
        convert.hf_export.fp8_quant.quantize_blockwise_2d(jnp.asarray(w))[0]).view(np.uint8))


# ------------------------------------------------------------------ bad input


def copy_checkpoint(checkpoints, tmp_path, case="v3_qlora_yarn_mtp"):
    src = checkpoints(case)[0]
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path, edit):
    """Applies edit(tensors) -> tensors to the shard holding the first tensor (and keeps the index right)."""
    files = CheckpointFiles(path)
    shard = files.tensors["model.embed_tokens.weight"].file
    tensors = edit(safetensors.torch.load_file(str(shard)))
    safetensors.torch.save_file(tensors, str(shard))
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard.name}
    index["weight_map"].update({n: shard.name for n in tensors})
    index_file.write_text(json.dumps(index))


BAD = {
    "missing_shard": (lambda p: (p / "model-00002-of-00002.safetensors").unlink(), "model-00002-of-00002"),
    "unknown_architecture": (lambda p: edit_config(p, architectures=["LlamaForCausalLM"]), "LlamaForCausalLM"),
    "unknown_key": (lambda p: edit_config(p, sliding_window=4096), "sliding_window"),
    "unsupported_value": (lambda p: edit_config(p, hidden_act="gelu"), "hidden_act"),
    "unsupported_rope": (lambda p: edit_config(p, rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                                                     "factor": 2.0}), "linear"),
    "wrong_shape": (lambda p: edit_tensors(p, lambda t: {**t, "model.embed_tokens.weight": torch.zeros(95, 64)}),
                    r"model\.embed_tokens\.weight has shape \[95, 64\], the config implies \[96, 64\]"),
    "unused_tensor": (lambda p: edit_tensors(p, lambda t: {**t, "model.layers.0.self_attn.rotary.inv_freq":
                                                           torch.ones(4)}), "model.layers.0.self_attn.rotary.inv_freq"),
    "missing_tensor": (lambda p: edit_tensors(p, lambda t: {n: v for n, v in t.items()
                                                            if n != "model.embed_tokens.weight"}),
                       "missing: model.embed_tokens.weight"),
    "mtp_copy_differs": (lambda p: edit_tensors(p, lambda t: {**t, "model.embed_tokens.weight":
                                                              t["model.embed_tokens.weight"] + 1e-3}),
                         r"model\.layers\.3\.embed_tokens\.weight differs from model\.embed_tokens\.weight"),
    "too_many_layers": (lambda p: edit_config(p, num_hidden_layers=2, first_k_dense_replace=1),
                        "unused.*model.layers.3"),
    "truncated_shard": (lambda p: cut(p / "model-00002-of-00002.safetensors", -1000),
                        r"model-00002-of-00002\.safetensors is truncated: its header describes [\d,]+ bytes, the "
                        r"file holds [\d,]+\. Download that shard again"),
    "cut_header": (lambda p: cut(p / "model-00001-of-00002.safetensors", 100),
                   r"model-00001-of-00002\.safetensors has a corrupt safetensors header"),
}


def cut(file, size: int) -> None:
    """Keeps the first `size` bytes of `file` (size < 0: drops the last -size), as an interrupted download."""
    with open(file, "r+b") as f:
        f.truncate(size if size >= 0 else file.stat().st_size + size)


@pytest.mark.parametrize("problem", sorted(BAD))
def test_bad_checkpoints_raise_naming_the_problem(problem, checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints, tmp_path)
    damage, message = BAD[problem]
    damage(path)
    with pytest.raises(ValueError, match=message):
        convert.load_checkpoint(str(path))


def test_fp8_scale_problems_are_named(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints, tmp_path, "v3_fp8_edge_blocks")
    scale = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"  # [138, 160] weight: 2 x 2 grid.
    shard = CheckpointFiles(path).tensors[scale].file
    tensors = safetensors.torch.load_file(str(shard))
    assert tuple(tensors[scale].shape) == (2, 2)
    safetensors.torch.save_file({**tensors, scale: torch.ones(1, 2)}, str(shard))
    with pytest.raises(ValueError, match=r"kv_a_proj_with_mqa\.weight_scale_inv has shape \[1, 2\].*needs \[2, 2\]"):
        convert.load_checkpoint(str(path))
    safetensors.torch.save_file({n: t for n, t in tensors.items() if n != scale}, str(shard))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"][scale]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="block scales .*kv_a_proj_with_mqa.weight_scale_inv are missing"):
        convert.load_checkpoint(str(path))


def test_mtp_depth_selection(checkpoints, tmp_path):
    path = checkpoints("v3_qlora_yarn_mtp")[0]
    cfg, variables = convert.load_checkpoint(str(path), num_nextn_predict_layers=0)  # MTP layer left out.
    assert cfg.num_nextn_predict_layers == 0 and "mtp_0" not in variables["params"]
    with pytest.raises(ValueError, match="declares 1 MTP"):
        convert.load_checkpoint(str(path), num_nextn_predict_layers=2)
    # A copy that differs may still be imported on request (the main tensor is used).
    path = copy_checkpoint(checkpoints, tmp_path)
    BAD["mtp_copy_differs"][0](path)
    cfg, _ = convert.load_checkpoint(str(path), allow_mtp_copy_mismatch=True)
    assert cfg.num_nextn_predict_layers == 1


# ------------------------------------------------------------------ sharded placement


def test_import_into_shardings_and_rules(checkpoints):
    path = checkpoints("v3_qlora_yarn_mtp")[0]
    cfg, reference = convert.load_checkpoint(str(path))
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    shardings = jax.tree_util.tree_map_with_path(
        lambda p, a: NamedSharding(mesh, PartitionSpec(*([None] * (a.ndim - 3)), "expert")
                                   if "experts" in [k.key for k in p] else PartitionSpec()), reference)
    _, sharded = convert.load_checkpoint(str(path), shardings=shardings)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, reference)
    experts = sharded["params"]["moe_layers"]["mlp"]["experts"]["gate_proj"]  # [L, E, D, F]
    assert experts.sharding == shardings["params"]["moe_layers"]["mlp"]["experts"]["gate_proj"]
    assert experts.addressable_shards[0].data.shape == (2, 2, 64, 32)
    _, by_rules = convert.load_checkpoint(str(path), mesh=mesh, rules=[("expert", "expert"), ("vocab", "data")])
    assert by_rules["params"]["mtp_0"]["block"]["mlp"]["experts"]["up_proj"].sharding.spec == PartitionSpec(
        "expert", None, None)
    assert by_rules["params"]["embed_tokens"]["embedding"].sharding.spec == PartitionSpec("data", None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), by_rules, reference)


# ------------------------------------------------------------------ configs and the command line


V3_RELEASED = dict(
    architectures=["DeepseekV3ForCausalLM"], attention_bias=False, attention_dropout=0.0, auto_map={},
    aux_loss_alpha=0.001, bos_token_id=0, eos_token_id=1, ep_size=1, first_k_dense_replace=3, hidden_act="silu",
    hidden_size=7168, initializer_range=0.02, intermediate_size=18432, kv_lora_rank=512,
    max_position_embeddings=163840, model_type="deepseek_v3", moe_intermediate_size=2048, moe_layer_freq=1,
    n_group=8, n_routed_experts=256, n_shared_experts=1, norm_topk_prob=True, num_attention_heads=128,
    num_experts_per_tok=8, num_hidden_layers=61, num_key_value_heads=128, num_nextn_predict_layers=1,
    pretraining_tp=1, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
    quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                             weight_block_size=[128, 128]),
    rms_norm_eps=1e-06, rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                                          original_max_position_embeddings=4096, type="yarn"),
    rope_theta=10000, routed_scaling_factor=2.5, scoring_func="sigmoid", seq_aux=True, tie_word_embeddings=False,
    topk_group=4, topk_method="noaux_tc", torch_dtype="bfloat16", transformers_version="4.46.3", use_cache=True,
    v_head_dim=128, vocab_size=129280)
V2_LITE_RELEASED = dict(
    architectures=["DeepseekV2ForCausalLM"], attention_bias=False, attention_dropout=0.0, auto_map={},
    aux_loss_alpha=0.001, bos_token_id=100000, eos_token_id=100001, first_k_dense_replace=1, hidden_act="silu",
    hidden_size=2048, initializer_range=0.02, intermediate_size=10944, kv_lora_rank=512,
    max_position_embeddings=163840, model_type="deepseek_v2", moe_intermediate_size=1408, moe_layer_freq=1,
    n_group=1, n_routed_experts=64, n_shared_experts=2, norm_topk_prob=False, num_attention_heads=16,
    num_experts_per_tok=6, num_hidden_layers=27, num_key_value_heads=16, pretraining_tp=1, q_lora_rank=None,
    qk_nope_head_dim=128, qk_rope_head_dim=64, rms_norm_eps=1e-06,
    rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=0.707, mscale_all_dim=0.707,
                      original_max_position_embeddings=4096, type="yarn"),
    rope_theta=10000, routed_scaling_factor=1.0, scoring_func="softmax", seq_aux=True, tie_word_embeddings=False,
    topk_group=1, topk_method="greedy", torch_dtype="bfloat16", transformers_version="4.33.1", use_cache=True,
    v_head_dim=128, vocab_size=102400)


@pytest.mark.parametrize("released, name", [(V3_RELEASED, "deepseek_v3"), (V2_LITE_RELEASED, "deepseek_v2_lite")])
def test_released_configs_map_to_our_configs(released, name):
    cfg, fmt = convert.from_hf(released)
    ours = model_config(name)
    assert cfg.replace(dtype=ours.dtype, remat=ours.remat, moe_dispatch=ours.moe_dispatch) == ours
    assert fmt.fp8_block == (128 if name == "deepseek_v3" else None) and fmt.rope_interleave
    assert convert.from_hf(convert.to_hf(cfg, fmt, released)) == (cfg, fmt)


def test_command_line_import_then_export(checkpoints, tmp_path):
    """`python -m deepseek_jax.convert` (import) -> orbax workdir -> export (library call): same FP8 bytes."""
    path = checkpoints("v3_fp8_edge_blocks")[0]
    (path / "tokenizer.json").write_text("{}")
    workdir, out = tmp_path / "work", tmp_path / "out"
    subprocess.run([sys.executable, "-m", "deepseek_jax.convert", f"--hf_path={path}", f"--workdir={workdir}"],
                   check=True, cwd=ROOT, capture_output=True)
    cfg, variables = convert.load_workdir(str(workdir))
    assert cfg.num_nextn_predict_layers == 1
    assert variables["params"]["embed_tokens"]["embedding"].dtype == jnp.float32  # FP8 on disk, float32 here.
    convert.workdir_to_hf(str(workdir), str(out), dtype="float8_e4m3fn")
    assert_identical(all_tensors(path), all_tensors(out))
    assert (out / "tokenizer.json").read_text() == "{}"


def test_generate_command_on_a_hugging_face_checkpoint_matches_transformers_greedy(tmp_path):
    """`python -m deepseek_jax.generate --hf_path=...` (cached, absorbed MLA, streamed) prints the same
    greedy continuation as a token-by-token argmax loop over transformers' full forward."""
    cfg = model_config(hidden_size=64, num_nextn_predict_layers=1)
    rng = np.random.default_rng(3)
    variables = jax.tree_util.tree_map_with_path(  # Strong random weights: a clear argmax at every step.
        lambda p, s: rng.normal(1.0 if "scale" in jax.tree_util.keystr(p) else 0.0, 0.3, s.shape).astype(np.float32),
        model.abstract_variables(cfg))
    convert.save_checkpoint(cfg, variables, str(tmp_path))
    prompt, new = "def", 12
    tokens = torch.tensor([list(prompt.encode())])
    hf = CLASSES["v3"][1].from_pretrained(str(tmp_path), attn_implementation="eager",
                                          experts_implementation="eager").eval()
    with torch.no_grad():
        for _ in range(new):
            tokens = torch.cat([tokens, hf(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    want = bytes(t for t in tokens[0, len(prompt):].tolist() if t < 256).decode(errors="replace")
    run = subprocess.run([sys.executable, "-m", "deepseek_jax.generate", f"--hf_path={tmp_path}",
                          "--config=configs/tiny.py", f"--prompt={prompt}", f"--max_new_tokens={new}",
                          "--nostop_at_eos"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == prompt + want + "\n"
    assert f"Generating with {tmp_path}" in run.stderr and f"{new} tokens in" in run.stderr
