"""DeepSeek Sparse Attention (V3.2): the lightning indexer selects what transformers' DeepseekV32 selects,
its top-k mask is what moves the logits, packed documents stay apart; the indexer's KL against NumPy, the
gradients of its two losses, the report's two training stages through the trainer; the settings checked.

The logits-level parity with transformers and the export round trip are the `v32_sparse_attention` case of
test_convert.py / test_convert_io.py (same transformers-made checkpoint, session-cached); cached decoding
with sparse attention is tests/test_infer.py's `dense_or_sparse` fixture.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import micro_run_config, model_config, read_rows

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_convert import FAST_COMPILE, checkpoints, tokens_for  # noqa: E402, F401  (checkpoints is a fixture)

from deepseek_jax import convert, model  # noqa: E402
from deepseek_jax.model import indexer as indexer_lib  # noqa: E402
from deepseek_jax.model.block import Block  # noqa: E402
from deepseek_jax.model.mla import attention_mask  # noqa: E402
from deepseek_jax.train.pretrain import train_and_evaluate  # noqa: E402
from deepseek_jax.train.validation import validate_run_config  # noqa: E402
from deepseek_jax.train.weights import load_weights  # noqa: E402

CASE = "v32_sparse_attention"


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
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
            out.append((scores, indexer_lib.top_k_mask(scores, allowed, cfg.index_topk)))
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
    ours = jax.device_get(our_selections(cfg, variables, jnp.asarray(tokens)))
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
    dense_cfg = cfg.dense_attention()
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


# ------------------------------------------------------------------ training the indexer (V3.2 section 2.1.1)


def test_indexer_kl_matches_numpy_on_a_hand_made_case():
    """KL(p || softmax(I)) per query over the marked keys, p the head-summed attention L1-normalised there;
    a query with no marked key (padding) gives 0, and no NaN reaches the gradient."""
    attention = np.array([[[0.6, 0.3, 0.1, 0.0], [0.2, 0.2, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0]]])  # [1, 3, 4]
    scores = np.array([[[1.0, -2.0, 0.5, 3.0], [0.0, 0.1, -0.3, 2.0], [1.0, 1.0, 1.0, 1.0]]])
    keys = np.array([[[True, True, True, False], [False, True, True, True], [False] * 4]])
    expected = []
    for t in range(3):
        marked = keys[0, t]
        if not marked.any():
            expected.append(0.0)
            continue
        p = attention[0, t, marked] / attention[0, t, marked].sum()
        q = np.exp(scores[0, t, marked]) / np.exp(scores[0, t, marked]).sum()
        expected.append(float(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p / q, 1.0)), 0.0))))
    got = indexer_lib.indexer_kl(jnp.asarray(attention, jnp.float32), jnp.asarray(scores, jnp.float32),
                                 jnp.asarray(keys))
    np.testing.assert_allclose(np.asarray(got)[0], expected, rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda s: indexer_lib.indexer_kl(jnp.asarray(attention, jnp.float32), s,
                                                     jnp.asarray(keys)).sum())(jnp.asarray(scores, jnp.float32))
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[~keys] == 0)


def is_indexer_path(path) -> bool:
    return "indexer" in jax.tree_util.keystr(path)


def test_gradients_flow_only_where_the_report_says(sparse_tiny):
    """Sparse training: the language-model loss trains everything but the indexers (not a single non-zero
    gradient reaches them), the indexers' KL trains only them (its target and its inputs are detached).
    (In the dense warm-up every other gradient is zeroed anyway: the two-stage test below.)"""
    cfg, variables = sparse_tiny
    cfg = cfg.replace(indexer_loss="sparse")
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, cfg.vocab_size)

    def losses(params):
        out = model.apply(cfg, {**variables, "params": params}, tokens)
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        lm = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
        kl = [s["indexer_kl"].sum() for s in out.router_stats.values()]
        assert len(kl) == 3  # The dense stack, the MoE stack, the MTP block.
        return lm, sum(kl)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def both_gradients(params):
        _, pull_back = jax.vjp(losses, params)
        one, zero = jnp.ones(()), jnp.zeros(())
        return pull_back((one, zero))[0], pull_back((zero, one))[0]

    lm_grads, kl_grads = both_gradients(variables["params"])
    flat_lm = jax.tree_util.tree_flatten_with_path(lm_grads)[0]
    flat_kl = jax.tree_util.tree_flatten_with_path(kl_grads)[0]
    for (path, g_lm), (_, g_kl) in zip(flat_lm, flat_kl):
        name = jax.tree_util.keystr(path)
        if is_indexer_path(path):
            assert not np.any(np.asarray(g_lm)), name
            assert np.any(np.asarray(g_kl)), name
        else:
            assert not np.any(np.asarray(g_kl)), name
    assert sum(float(np.abs(np.asarray(g)).sum()) for p, g in flat_lm if not is_indexer_path(p)) > 0


def test_the_report_two_stages_train_from_a_dense_model(tmp_path):
    """The dense warm-up (configs/tiny_dsa.py's stage 1, on micro shapes) from a dense model's checkpoint:
    every weight but the new indexers' stays bit for bit the dense model's and so does the validation loss;
    then sparse training from the warm-up run: the model trains through the top-k mask, the KL is reported."""
    shape = dict(num_nextn_predict_layers=0, first_k_dense_replace=0)  # One kind of layer: fewer programs.
    index = dict(index_n_heads=2, index_head_dim=8, index_topk=4, **shape)
    dense_config = micro_run_config(tmp_path)
    dense_config.model.update(**shape)
    dense_cfg = validate_run_config(dense_config)
    dense = model.init(dense_cfg, jax.random.key(7))
    convert.save_checkpoint(dense_cfg, dense, str(tmp_path / "dense"))

    def run(name, **train):
        c = micro_run_config(tmp_path, write_corpus=False, steps=2, warmup_steps=1, eval_every=10, **train)
        c.model.update(**index)
        train_and_evaluate(c, str(tmp_path / name))
        return c, load_weights(str(tmp_path / name), validate_run_config(c), optimizer_cfg=c.train).variables

    warm_config, warm = run("warmup", indexer_stage="dense_warmup", init_from=str(tmp_path / "dense"))
    for path, leaf in jax.tree_util.tree_flatten_with_path(warm)[0]:
        if not is_indexer_path(path):
            dense_leaf = dense
            for key in path:
                dense_leaf = dense_leaf[key.key]
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(dense_leaf), err_msg=jax.tree_util.keystr(path))
    fresh = model.init(validate_run_config(warm_config), jax.random.key(warm_config.seed))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(warm["params"])[0], jax.tree.leaves(fresh["params"]))
        if is_indexer_path(p) and "scale" not in jax.tree_util.keystr(p)]
    assert moved and all(moved)  # Every indexer matrix learned (the KL reaches each layer's).
    warm_rows = read_rows(tmp_path / "warmup")
    assert warm_rows[0]["eval_loss"] == warm_rows[-1]["eval_loss"]  # Dense attention, frozen weights.
    assert all(r["indexer_kl"] for r in warm_rows if r.get("loss"))

    _, sparse = run("sparse", indexer_stage="sparse", init_from=str(tmp_path / "warmup"))
    changed = [not np.array_equal(np.asarray(a), np.asarray(b)) for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(sparse["params"])[0], jax.tree.leaves(warm["params"]))
        if not is_indexer_path(p)]
    assert all(changed)
    sparse_rows = read_rows(tmp_path / "sparse")
    assert all(float(r["indexer_kl"]) > 0 for r in sparse_rows if r.get("loss"))
    assert sparse_rows[0]["eval_loss"] != warm_rows[-1]["eval_loss"]  # The top-4 mask changes the model.


def test_indexer_stage_settings_are_checked(tmp_path):
    from common import config

    for stage in ("dense_warmup", "sparse"):  # The shipped two-stage config, both variants.
        assert validate_run_config(config("tiny_dsa", f"stage={stage}")).sparse_attention
    c = micro_run_config(tmp_path, indexer_stage="dense_warmup")
    with pytest.raises(ValueError, match="train.indexer_stage.*lightning indexer"):
        validate_run_config(c)  # A dense model has no indexer to train.
    c.train.indexer_stage = "warmup"
    with pytest.raises(ValueError, match="train.indexer_stage"):
        validate_run_config(c)
