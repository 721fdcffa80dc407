"""DeepSeek Sparse Attention (V3.2): the lightning indexer selects what transformers' DeepseekV32 selects,
its top-k mask is what moves the logits, packed documents stay apart, and the configuration is checked.

The logits-level parity with transformers and the export round trip are the `v32_sparse_attention` case of
test_convert.py / test_convert_io.py (same transformers-made checkpoint, session-cached).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import model_config

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_convert import FAST_COMPILE, checkpoints, tokens_for  # noqa: E402, F401  (checkpoints is a fixture)

from deepseek_jax import convert, model  # noqa: E402
from deepseek_jax.model import indexer as indexer_lib  # noqa: E402
from deepseek_jax.model.block import Block  # noqa: E402
from deepseek_jax.model.mla import attention_mask  # noqa: E402

CASE = "v32_sparse_attention"


def our_selections(cfg, variables, tokens):
    """Per decoder layer: (index scores [B,T,T], selected keys bool [B,T,T]) of our indexer, layer by layer."""
    params, routing = variables["params"], variables["routing"]
    positions = model.transformer.default_positions(tokens)
    segments = jnp.ones_like(tokens)
    allowed = attention_mask(segments)[:, 0]
    x = params["embed_tokens"]["embedding"][tokens]
    out = []
    for stack, count in (("dense_layers", cfg.num_dense_layers), ("moe_layers", cfg.num_moe_layers)):
        for i in range(count):
            layer = jax.tree.map(lambda a: a[i], {"params": params[stack], "routing": routing.get(stack, {})})
            (x, _), inter = Block(cfg, stack == "moe_layers").apply(
                layer, x, positions, segments, capture_intermediates=True, mutable=["intermediates"])
            q, weights, keys = inter["intermediates"]["self_attn"]["indexer"]["__call__"][0]
            scores = indexer_lib.index_scores(q, weights, keys)
            out.append((np.asarray(scores), np.asarray(indexer_lib.top_k_mask(scores, allowed, cfg.index_topk))))
    return out


def test_indexer_selects_the_keys_transformers_selects(checkpoints):
    """Every layer, every query: the same top-k set as transformers' DeepseekV32Indexer (causal: keys after a
    query that torch.topk returns for short prefixes are masked anyway), on a seed whose k-th and (k+1)-th
    scores are apart by far more than float32 rounding, so that the comparison is about the selection."""
    path, hf_model, hf_cfg = checkpoints(CASE)
    cfg, variables = convert.load_checkpoint(str(path))
    tokens = tokens_for(cfg)
    chosen = []
    hooks = [layer.self_attn.indexer.register_forward_hook(lambda m, i, o: chosen.append(o.numpy()))
             for layer in hf_model.model.layers]
    with torch.no_grad():
        hf_model(torch.as_tensor(tokens))
    for h in hooks:
        h.remove()
    ours = our_selections(cfg, variables, jnp.asarray(tokens))
    B, T = tokens.shape
    k = cfg.index_topk
    causal = np.tril(np.ones((T, T), bool))
    assert len(ours) == len(chosen) == cfg.num_hidden_layers
    for (scores, selected), hf_indices in zip(ours, chosen):
        assert hf_indices.shape == (B, T, k)
        reference = np.zeros((B, T, T), bool)
        np.put_along_axis(reference, hf_indices.astype(np.int64), True, axis=-1)
        np.testing.assert_array_equal(selected, reference & causal)
        for t in range(k, T):  # Queries with more than k earlier keys: a real cut.
            ranked = -np.sort(-scores[:, t, :t + 1], axis=-1)
            assert np.all(ranked[:, k - 1] - ranked[:, k] > 1e-3), "near-tie at the top-k cut: pick another seed"
        assert np.all(selected.sum(-1) == np.minimum(np.arange(1, T + 1), k))  # Fewer than k: all of them.


@pytest.fixture(scope="module")
def sparse_tiny():
    cfg = model_config(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                       num_nextn_predict_layers=1, index_n_heads=4, index_head_dim=24, index_topk=3)
    return cfg, model.init(cfg, jax.random.key(0))


def test_large_top_k_is_dense_attention_and_the_sparse_mask_matters(sparse_tiny):
    """index_topk >= T gives the dense model without the indexer's weights (V3's forward; up to rounding, the
    sparse path attending in MLA's absorbed form); the configured k = 3 changes every position after the third
    and none before."""
    cfg, variables = sparse_tiny
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    forward = jax.jit(model.apply, static_argnums=0, compiler_options=FAST_COMPILE)
    sparse = forward(cfg, variables, tokens)
    wide = forward(cfg.replace(index_topk=10), variables, tokens)
    dense_cfg = cfg.replace(index_n_heads=0, index_head_dim=0, index_topk=0)
    dense_vars = jax.tree_util.tree_map_with_path(lambda p, a: a, variables)
    for stack in ("dense_layers", "moe_layers"):
        del dense_vars["params"][stack]["self_attn"]["indexer"]
    del dense_vars["params"]["mtp_0"]["block"]["self_attn"]["indexer"]
    jax.tree.map(lambda a, b: None, dense_vars, model.abstract_variables(dense_cfg))  # Same tree as V3's.
    dense = forward(dense_cfg, dense_vars, tokens)
    np.testing.assert_allclose(np.asarray(wide.logits), np.asarray(dense.logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(wide.mtp_logits), np.asarray(dense.mtp_logits), atol=1e-5, rtol=0)
    diff = np.abs(np.asarray(sparse.logits) - np.asarray(dense.logits)).max(axis=(0, 2))
    assert np.all(diff[:3] < 1e-5) and np.all(diff[3:] > 1e-3), diff


def test_packed_documents_select_and_attend_as_if_alone(sparse_tiny):
    """Two documents packed in one row (positions restarting, segment ids 1 and 2) and a padded tail give each
    document the logits it has alone: the indexer picks its k keys within the query's own document."""
    cfg, variables = sparse_tiny
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 6)
    packed = jnp.asarray(np.concatenate([a, b, [0, 0]])[None], jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(7), np.arange(6), [0, 0]])[None], jnp.int32)
    segments = jnp.asarray(np.concatenate([np.ones(7), 2 * np.ones(6), [0, 0]])[None], jnp.int32)
    forward = jax.jit(model.apply, static_argnums=0, compiler_options=FAST_COMPILE)
    together = np.asarray(forward(cfg, variables, packed, positions, segments).logits)[0]
    alone_a = np.asarray(forward(cfg, variables, jnp.asarray(a[None], jnp.int32)).logits)[0]
    alone_b = np.asarray(forward(cfg, variables, jnp.asarray(b[None], jnp.int32)).logits)[0]
    np.testing.assert_allclose(together[:7], alone_a, atol=1e-5)
    np.testing.assert_allclose(together[7:13], alone_b, atol=1e-5)


@pytest.mark.parametrize("changes, field", [
    (dict(index_n_heads=4, index_head_dim=32), "index_topk"),
    (dict(index_n_heads=4, index_head_dim=32, index_topk=8, q_lora_rank=None), "q_lora_rank"),
    (dict(index_n_heads=4, index_head_dim=8, index_topk=8), "index_head_dim"),
    (dict(index_n_heads=-1), "index_n_heads"),
])
def test_bad_sparse_attention_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"model.{field}"):
        model_config(**changes)


def test_hugging_face_config_maps_both_ways():
    """A V3.2 config.json with transformers' per-layer lists reads into our config and is written back as V3.2;
    a V3.2 export of a dense model (or a V3 export of a sparse one) is refused."""
    cfg = model_config(hidden_size=64, index_n_heads=4, index_head_dim=32, index_topk=8)
    fmt = convert.CheckpointFormat(convert.hf_config.V32)
    hf = convert.hf_config.to_hf(cfg, fmt)
    assert hf["architectures"] == ["DeepseekV32ForCausalLM"] and hf["index_topk"] == 8
    L, k = cfg.num_hidden_layers, cfg.first_k_dense_replace
    listed = dict(hf, layer_types=["indexed_attention"] * L, mlp_layer_types=["dense"] * k + ["sparse"] * (L - k))
    assert convert.from_hf(listed) == (cfg, fmt)
    with pytest.raises(ValueError, match="mlp_layer_types"):
        convert.from_hf(dict(listed, mlp_layer_types=["sparse"] * L))
    with pytest.raises(ValueError, match="index_topk=0"):
        convert.hf_config.to_hf(model_config(), fmt)
    with pytest.raises(ValueError, match="export as DeepseekV32ForCausalLM"):
        convert.hf_config.to_hf(cfg, convert.CheckpointFormat(convert.hf_config.V3))
    with pytest.raises(ValueError, match="not understood"):  # V3 has no indexer keys.
        convert.from_hf(dict(hf, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3"))
