"""Cached generation: latent cache == full forward, absorbed == naive, speculative == plain greedy,
cached == uncached generation, sampling filters, bad input, and the command line's streaming path."""

import functools
import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from common import micro_run_config, model_config

from deepseek_jax import infer, model
from deepseek_jax.data import tokenizers
from deepseek_jax.infer import cached, sampling, speculative, text
from deepseek_jax.model import experts
from deepseek_jax.model.mtp import shift_left
from deepseek_jax.parallel.dispatch import for_decoding
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.sample import generate_uncached

DEPTH = 2  # MTP modules, so drafts of two tokens are verified per step.
PROMPTS = np.array([[11, 12, 13, 14, 15, 16, 17], [21, 22, 23, 0, 0, 0, 0], [31, 32, 33, -1, -1, -1, -1]])
LENGTHS = np.array([7, 3, 3])  # Right padding: what the padding holds does not matter.
NEW = 10


@pytest.fixture(scope="module")
def tiny():
    cfg = model_config(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                       num_nextn_predict_layers=DEPTH)
    return cfg, random_variables(cfg, 0)


@pytest.fixture(scope="module", params=["dense", "sparse"])
def dense_or_sparse(request, tiny):
    """`tiny`, and tiny with DeepSeek Sparse Attention (V3.2): each query attends to the lightning indexer's
    top 3 keys, over the cache too (whose layers then also hold the indexer's keys)."""
    if request.param == "dense":
        return tiny
    cfg = tiny[0].replace(index_n_heads=4, index_head_dim=24, index_topk=3)
    return cfg, random_variables(cfg, 0)


def random_variables(cfg, seed):
    """Variables of the model's shapes, drawn on the host (no init program to compile): N(0, 0.02)
    kernels, norm scales around 1, and non-zero balancing biases so that passing the routing state to
    each layer matters."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if "scale" in name else (0.05 if "routing" in name else 0.02) * noise)

    return jax.tree_util.tree_map_with_path(draw, model.abstract_variables(cfg))


def test_cache_holds_only_the_latent_and_the_rope_key(tiny):
    cfg, _ = tiny
    B, S = 3, 11
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    shapes = infer.cache_shapes(cfg, B, S, mtp=True)
    layers = {"dense_layers": cfg.num_dense_layers, "moe_layers": cfg.num_moe_layers, "mtp": DEPTH}
    assert set(shapes.layers) == set(layers)
    for name, L in layers.items():
        assert shapes.layers[name].c_kv.shape == (L, B, S, C)
        assert shapes.layers[name].k_rope.shape == (L, B, S, R)
    assert shapes.lengths.shape == (B,)
    per_slot = sum(leaf.size for leaf in jax.tree.leaves(shapes.layers)) / (B * S)
    assert per_slot == (C + R) * (cfg.num_hidden_layers + DEPTH)  # Nothing per head.
    assert infer.bytes_per_token(shapes) == (C + R) * (cfg.num_hidden_layers + DEPTH) * 4
    assert set(infer.cache_shapes(cfg, B, S).layers) == {"dense_layers", "moe_layers"}  # MTP only to draft.


@functools.partial(jax.jit, static_argnums=(0,), static_argnames="attention")
def _chunk(cfg, variables, cache, tokens_BT, ahead_PBT, attention):
    """Main model, then every MTP depth, over the same new positions (teacher forcing)."""
    logits, h, cache = cached.extend(cfg, variables, cache, tokens_BT, attention=attention)
    mtp = []
    for k in range(cfg.num_nextn_predict_layers):
        mtp_logits, h, cache = cached.extend_mtp(cfg, variables, cache, k, h, ahead_PBT[k], attention=attention)
        mtp.append(mtp_logits)
    return logits, jnp.stack(mtp), cache


def test_cached_decoding_matches_full_forward_and_absorbed_matches_naive(dense_or_sparse):
    """Prefill rows of different lengths, then feed one token at a time: every position's main and MTP
    logits equal the full-sequence forward's, and absorbed attention equals naive at every step."""
    cfg, variables = dense_or_sparse
    B, T = 3, 10
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, cfg.vocab_size)
    full = jax.jit(model.apply, static_argnums=0)(cfg, variables, tokens)
    ahead = jnp.stack([shift_left(tokens, k + 1) for k in range(DEPTH)])  # What MTP depth k reads.
    lengths = np.array([4, 1, 6])
    width, rows = lengths.max(), np.arange(B)
    positions = np.broadcast_to(np.arange(width)[None, :], (B, width))
    valid = positions < lengths[:, None]  # Right padding: later prompt slots are junk, then overwritten.
    cache = infer.init_cache(cfg, B, T, mtp=True)
    logits, mtp, cache = _chunk(cfg, variables, cache, tokens[:, :width], ahead[:, :, :width],
                                attention="absorbed")
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(full.logits)[rows[:, None], positions][valid],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mtp)[:, valid], np.asarray(full.mtp_logits)[:, rows[:, None], positions][
        :, valid], atol=1e-5, rtol=1e-5)
    caches = dict.fromkeys(("absorbed", "naive"), cache.replace(lengths=jnp.asarray(lengths, jnp.int32)))
    for i in range(T - width):
        pos = lengths + i
        step = {}
        for attention in caches:
            logits, mtp, new_cache = _chunk(cfg, variables, caches[attention], tokens[rows, pos][:, None],
                                            ahead[:, rows, pos][:, :, None], attention=attention)
            caches[attention] = new_cache.replace(lengths=new_cache.lengths + 1)
            step[attention] = (np.asarray(logits)[:, 0], np.asarray(mtp)[:, :, 0])
        np.testing.assert_allclose(step["absorbed"][0], step["naive"][0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(step["absorbed"][1], step["naive"][1], atol=1e-5, rtol=0)
        np.testing.assert_allclose(step["absorbed"][0], np.asarray(full.logits)[rows, pos], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(step["absorbed"][1], np.asarray(full.mtp_logits)[:, rows, pos], atol=1e-5,
                                   rtol=1e-5)


def test_absorbed_weights_are_split_once_and_read_from_their_collection(tiny):
    """`with_absorbed_weights` holds each attention's kv_b_proj kernel [.., C, H*(K+V)] as W_UK[.., h, k, c] =
    kernel[.., c, h(K+V) + k] and W_UV[.., h, c, v] = kernel[.., c, h(K+V) + K + v]; a pass given them reads
    them (zeroing W_UV changes its logits) and returns what splitting the kernels itself returns."""
    cfg, variables = tiny
    split = cached.with_absorbed_weights(cfg, variables)
    assert cached.with_absorbed_weights(cfg, split) is split
    H, K, V = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    kernels = [(tuple(key.key for key in path[:-2]), np.asarray(leaf))
               for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
               if [key.key for key in path[-2:]] == ["kv_b_proj", "kernel"]]
    assert len(kernels) == 2 + DEPTH  # The dense stack, the MoE stack, each MTP block.
    for prefix, kernel in kernels:
        entry = functools.reduce(lambda tree, name: tree[name], prefix, split["absorbed"])
        *lead, C, _ = kernel.shape
        per_head = kernel.reshape(*lead, C, H, K + V)
        np.testing.assert_array_equal(entry["w_uk"], np.einsum("...chk->...hkc", per_head[..., :K]))
        np.testing.assert_array_equal(entry["w_uv"], np.einsum("...chv->...hcv", per_head[..., K:]))
    B, T = 2, 5
    tokens = jax.random.randint(jax.random.key(4), (B, T), 0, cfg.vocab_size)
    ahead = jnp.stack([shift_left(tokens, k + 1) for k in range(DEPTH)])
    cache = infer.init_cache(cfg, B, 8, mtp=True)
    (logits, mtp, _), (split_logits, split_mtp, _) = (_chunk(cfg, v, cache, tokens, ahead, attention="absorbed")
                                                      for v in (variables, split))
    np.testing.assert_allclose(split_logits, logits, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(split_mtp, mtp, atol=1e-6, rtol=1e-6)
    no_values = {**split, "absorbed": jax.tree.map(lambda w: w, split["absorbed"])}  # New dicts, same arrays.
    no_values["absorbed"]["moe_layers"]["self_attn"]["w_uv"] = jnp.zeros_like(
        split["absorbed"]["moe_layers"]["self_attn"]["w_uv"])
    changed = np.asarray(_chunk(cfg, no_values, cache, tokens, ahead, attention="absorbed")[0])
    assert np.max(np.abs(changed - np.asarray(logits))) > 1e-3


def test_gather_dispatch_equals_dense():
    """The decoding MoE dispatch (each token gathers its experts' weights) == every expert on every token."""
    N, D, F, E, K = 5, 16, 8, 6, 2
    rng = np.random.default_rng(4)
    x = rng.standard_normal((N, D), np.float32)
    w = tuple(rng.standard_normal(shape, np.float32) for shape in [(E, D, F), (E, D, F), (E, F, D)])
    indices = rng.integers(0, E, (N, K)).astype(np.int32)
    weights = rng.uniform(size=(N, K)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(experts.gather_dispatch)(x, weights, indices, w)),
                               np.asarray(jax.jit(experts.dense_dispatch)(x, weights, indices, w)), atol=1e-5,
                               rtol=1e-5)
    assert for_decoding(model_config(), 4).moe_dispatch == "gather"  # 4 tokens x 2 <= 8 experts.
    assert for_decoding(model_config(), 5).moe_dispatch == "ragged"


def _silent_mtp(cfg, variables):
    """MTP modules that always draft token 0: a zero input projection makes their hidden state zero."""
    params = dict(variables["params"])
    for k in range(DEPTH):
        params[f"mtp_{k}"] = {**params[f"mtp_{k}"], "eh_proj": {"kernel": jnp.zeros((2 * cfg.hidden_size,
                                                                                      cfg.hidden_size))}}
    return {**variables, "params": params}


def _oracle_mtp(cfg, variables):
    """A model whose main prediction depends on the current token only (every block adds zero), and MTP
    modules that pass the embedding of the token ahead straight through: each draft is exactly what
    the main model will predict there, so every draft is accepted."""

    def zero_outputs(block):
        block = jax.tree.map(lambda a: a, block)
        block["self_attn"]["o_proj"]["kernel"] = jnp.zeros_like(block["self_attn"]["o_proj"]["kernel"])
        mlp = block["mlp"]
        for name in ("down_proj",):
            if "experts" in mlp:
                mlp["experts"][name] = jnp.zeros_like(mlp["experts"][name])
                mlp["shared_experts"][name]["kernel"] = jnp.zeros_like(mlp["shared_experts"][name]["kernel"])
            else:
                mlp[name]["kernel"] = jnp.zeros_like(mlp[name]["kernel"])
        return block

    params = dict(variables["params"])
    for name in ("dense_layers", "moe_layers"):
        params[name] = zero_outputs(params[name])
    D = cfg.hidden_size
    params["norm"] = {"scale": jnp.ones((D,))}  # Unit norms: RMSNorm(RMSNorm(e)) == RMSNorm(e).
    for k in range(DEPTH):
        mtp = dict(params[f"mtp_{k}"])
        mtp["block"] = zero_outputs(mtp["block"])
        mtp["eh_proj"] = {"kernel": jnp.concatenate([jnp.eye(D), jnp.zeros((D, D))])}  # Embedding half.
        mtp["enorm"] = mtp["norm"] = {"scale": jnp.ones((D,))}
        params[f"mtp_{k}"] = mtp
    return {**variables, "params": params}


@pytest.mark.parametrize("drafter", ["untrained", "silent", "oracle"])
def test_speculative_greedy_equals_plain_greedy(tiny, drafter):
    cfg, variables = tiny
    make = {"untrained": lambda c, v: v, "silent": _silent_mtp, "oracle": _oracle_mtp}[drafter]
    variables = make(cfg, variables)
    run = functools.partial(infer.decode, cfg, variables, PROMPTS, max_new_tokens=NEW, prompt_lengths=LENGTHS,
                            pad_id=-1)
    plain, spec = run(), run(speculative=True)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    np.testing.assert_array_equal(spec.lengths, LENGTHS + NEW)
    rate = spec.acceptance_rate
    if drafter == "silent":  # Every draft (token 0) is rejected, at every step and depth.
        generated = np.concatenate([plain.tokens[b, n:n + NEW] for b, n in enumerate(LENGTHS)])
        assert not np.any(generated == 0)  # (So that token 0 is always wrong.)
        assert rate == 0 and spec.forward_passes == plain.forward_passes == NEW
    elif drafter == "oracle":  # Every draft is accepted: D + 1 tokens per pass after the prefill's one.
        assert rate == 1.0 and spec.forward_passes == 1 + -(-(NEW - 1) // (DEPTH + 1))
    else:
        assert rate < 1.0
    # With a stop token (the 4th token row 0 generates): same tokens, pad_id after the stop.
    stop = int(plain.tokens[0, LENGTHS[0] + 3])
    plain_stop, spec_stop = run(stop_tokens=[stop]), run(stop_tokens=[stop], speculative=True)
    np.testing.assert_array_equal(spec_stop.tokens, plain_stop.tokens)
    for b in range(3):
        row = plain.tokens[b, LENGTHS[b]:LENGTHS[b] + NEW]
        kept = int(np.argmax(row == stop)) + 1 if np.any(row == stop) else NEW
        end = LENGTHS[b] + kept
        np.testing.assert_array_equal(plain_stop.tokens[b, :end], plain.tokens[b, :end])
        assert np.all(plain_stop.tokens[b, LENGTHS[b] + kept:] == -1)
        assert plain_stop.lengths[b] == LENGTHS[b] + kept


def test_generate_matches_uncached_reference(dense_or_sparse):
    cfg, variables = dense_or_sparse
    out = infer.generate(cfg, variables, PROMPTS, max_new_tokens=NEW, prompt_lengths=LENGTHS, pad_id=-1)
    assert out.shape == (3, PROMPTS.shape[1] + NEW)
    for b, length in enumerate(LENGTHS):
        ref = generate_uncached(cfg, variables, jnp.asarray(PROMPTS[b:b + 1, :length]), NEW)
        np.testing.assert_array_equal(out[b, :length + NEW], np.asarray(ref[0]))
        assert np.all(out[b, length + NEW:] == -1)


def _top_p_reference(logits, p):
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    size = int(np.searchsorted(cumulative, p) + 1)  # Smallest prefix with mass >= p.
    keep = np.zeros(len(probs), bool)
    keep[order[:size]] = True
    return keep


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.62, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
    logits = np.array(jax.random.normal(jax.random.key(3), (4, 50)) * 2.0, np.float32)
    logits[1, 3:8] = logits[1, 2]  # Ties.
    choice = sampling.Sampling.make(1.0, None, top_p, vocab_size=50)
    got = np.isfinite(np.asarray(jax.jit(sampling.filtered_logits)(jnp.asarray(logits), choice)))
    for row in range(4):
        np.testing.assert_array_equal(got[row], _top_p_reference(logits[row].astype(np.float64), top_p))


def test_top_k_keeps_exactly_k():
    logits = jnp.array([[1.0, 5.0, 5.0, 9.0, -2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    choice = sampling.Sampling.make(1.0, 2, None, vocab_size=5)
    kept = np.isfinite(np.asarray(jax.jit(sampling.filtered_logits)(logits, choice)))
    np.testing.assert_array_equal(kept, [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]])


def test_sampling_top_k_1_is_greedy_and_keys_are_reproducible(tiny):
    cfg, variables = tiny
    run = functools.partial(infer.generate, cfg, variables, PROMPTS, max_new_tokens=NEW, prompt_lengths=LENGTHS)
    greedy = run()
    # One compiled sampler: temperature, top_k and top_p are traced.
    np.testing.assert_array_equal(run(temperature=0.7, top_k=1, key=jax.random.key(5)), greedy)
    sampled = [run(temperature=1.0, top_p=0.95, key=jax.random.key(s)) for s in (7, 7, 8)]
    np.testing.assert_array_equal(sampled[0], sampled[1])
    assert not np.array_equal(sampled[0], sampled[2])


def test_speculative_sampling_keeps_the_target_distribution():
    """Accept with min(1, p/q), else resample from max(p - q, 0): the emitted token is distributed as p."""
    V, N = 6, 20000
    p = jnp.array([0.05, 0.4, 0.1, 0.2, 0.05, 0.2])
    q = jnp.array([0.3, 0.1, 0.1, 0.3, 0.15, 0.05])
    drafts = jax.random.categorical(jax.random.key(0), jnp.log(q), shape=(N, 1)).astype(jnp.int32)
    logits = jnp.broadcast_to(jnp.log(p), (N, 2, V))
    q_BDV = jnp.broadcast_to(q, (N, 1, V))
    accepted, emitted = jax.jit(speculative.verify)(jax.random.key(1), logits, drafts, q_BDV,
                                                    sampling.Sampling.make(1.0))
    freq = np.bincount(np.asarray(emitted[:, 0]), minlength=V) / N
    np.testing.assert_allclose(freq, np.asarray(p), atol=0.01)
    np.testing.assert_allclose(float(accepted.mean()), float(jnp.minimum(p, q).sum()), atol=0.01)


def test_bad_input_is_a_clear_error(tiny):
    cfg, variables = tiny
    prompt = np.ones((2, 5), np.int32)

    def check(match, prompt=prompt, config=cfg, **kwargs):
        kwargs.setdefault("max_new_tokens", 4)
        with pytest.raises(ValueError, match=match):
            infer.generate(config, variables, prompt, **kwargs)

    check("longer than the cache", cache_size=4)
    check("cannot hold", cache_size=6)
    check("empty", prompt=np.zeros((2, 0), np.int32))
    check("empty prompt", prompt_lengths=[5, 0])
    check(r"not a token id.*vocab_size=264", prompt=np.array([[1, 264]]))
    check(r"token -3 at row 1, position 2", prompt=np.array([[1, 2, 3], [1, 2, -3]]))
    check("exceed", prompt_lengths=[5, 6])
    check("max_position_embeddings", max_new_tokens=cfg.max_position_embeddings)
    check("needs a PRNG key", temperature=0.5)
    check("top_p", temperature=0.5, top_p=0.0, key=jax.random.key(0))
    check("top_k", temperature=0.5, top_k=0, key=jax.random.key(0))
    check("has none", speculative=True, config=cfg.replace(num_nextn_predict_layers=0))
    check("attention", attention="flash")
    check("stop_tokens", stop_tokens=[cfg.vocab_size])
    check("max_new_tokens", max_new_tokens=-1)


def test_command_line_streams_a_checkpoint(tiny, tmp_path):
    """The main's path: a training checkpoint in a workdir, streamed with speculative sampling at top_k=1,
    which must give the greedy tokens (the uncached reference's)."""
    cfg, variables = tiny
    config = micro_run_config(tmp_path)
    config.model = ml_collections.ConfigDict(cfg.to_dict())
    tx = make_optimizer(config.train)
    state_like = jax.eval_shape(lambda: step_lib.init_state(cfg, tx, jax.random.key(0)))
    state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state_like).replace(
        params=variables["params"], routing=variables["routing"])
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=1, async_save=False)
    ckpt.save(3, state, ema=state.params, data_state={}, model_config=cfg)
    ckpt.close()
    out, err = io.StringIO(), io.StringIO()
    prompt = "def"
    result = text.run(config, workdir=str(tmp_path / "run"), use_ema=True, prompt=prompt, max_new_tokens=NEW,
                      speculative=True, temperature=0.8, top_k=1, out=out, err=err)
    tokenizer = tokenizers.make_tokenizer(config.data)
    ids = tokenizer.encode(prompt)[None, :]
    want = generate_uncached(cfg, variables, jnp.asarray(ids), NEW)
    length = result.lengths[0]
    np.testing.assert_array_equal(result.tokens[0, :length], np.asarray(want[0, :length]))
    if length < want.shape[1]:  # Stopped at the end-of-document token.
        assert result.tokens[0, length - 1] == tokenizer.eos_id
    generated = result.tokens[0, ids.shape[1]:length]
    assert out.getvalue() == prompt + tokenizer.decode(generated, skip_special_tokens=True) + "\n"
    assert "step 3 (EMA)" in err.getvalue() and "accepted" in err.getvalue()
    with pytest.raises(checkpoint_lib.CheckpointError, match="does not exist"):
        text.run(config, workdir=str(tmp_path / "nowhere"), prompt="x", max_new_tokens=1)


def test_incremental_text_waits_for_whole_characters():
    decoder = text.IncrementalText(tokenizers.ByteTokenizer())
    pieces = [decoder.push([b]) for b in "é!".encode()] + [decoder.finish()]
    assert pieces == ["", "é", "!", ""]
