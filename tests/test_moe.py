"""DeepSeekMoE: the gate against a NumPy reference on adversarial cases; dense == ragged dispatch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import model_config

from deepseek_jax.model.experts import blocked_swiglu
from deepseek_jax.model.moe import MoE, select_experts, sequence_balance_loss


def route_reference(scores, bias, cfg):
    """Group-limited routing, token by token, ties to the lower index. Returns (weights, indices)."""
    N, E = scores.shape
    size = E // cfg.n_group
    all_weights, all_indices = [], []
    for n in range(N):
        choice = scores[n] + (0.0 if bias is None else bias)
        allowed = list(range(E))
        if cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group:
            group_scores = []
            for g in range(cfg.n_group):
                members = sorted(choice[g * size:(g + 1) * size], reverse=True)
                group_scores.append(members[0] if bias is None else members[0] + members[1])
            kept = sorted(range(cfg.n_group), key=lambda g: (-group_scores[g], g))[:cfg.topk_group]
            allowed = [e for e in range(E) if e // size in kept]
        chosen = sorted(allowed, key=lambda e: (-choice[e], e))[:cfg.num_experts_per_tok]
        w = np.array([scores[n, e] for e in chosen])  # Affinities, never choice = affinity + bias.
        if cfg.norm_topk_prob:
            w = w / w.sum()
        all_weights.append(w * cfg.routed_scaling_factor)
        all_indices.append(chosen)
    return np.array(all_weights), np.array(all_indices)


def tiny_gate_config(**overrides):
    return model_config(**overrides)  # 8 experts, 4 groups of 2, keep 2 groups, top-2.


ADVERSARIAL = {
    # All equal: ties everywhere, lowest groups and lowest experts win.
    "all_tied": (np.full((1, 8), 0.5), None),
    # Group 3 holds the single best expert but groups 0 and 1 have better top-2 sums.
    "best_expert_in_losing_group": (np.array([[0.6, 0.6, 0.55, 0.55, 0.1, 0.1, 0.9, 0.0]]), np.zeros(8)),
    # Without a bias a group is scored by its max instead: now group 3 is kept.
    "max_scoring_without_bias": (np.array([[0.6, 0.6, 0.55, 0.55, 0.1, 0.1, 0.9, 0.0]]), None),
    # The bias changes which experts win, but the weights must stay the raw affinities.
    "bias_flips_selection": (np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]]),
                             np.array([-0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5])),
    # Tied group scores (0.5 + 0.25 in two groups): the lower group index wins.
    "tied_groups": (np.array([[0.25, 0.5, 0.5, 0.25, 0.125, 0.125, 0.0, 0.75]]), np.zeros(8)),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_gate_adversarial_cases(case):
    scores, bias = ADVERSARIAL[case]
    cfg = tiny_gate_config(topk_method="noaux_tc" if bias is not None else "group_limited_greedy")
    got_w, got_i = select_experts(jnp.asarray(scores, jnp.float32),
                                  None if bias is None else jnp.asarray(bias, jnp.float32), cfg)
    want_w, want_i = route_reference(scores, bias, cfg)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    np.testing.assert_allclose(np.asarray(got_w), want_w, rtol=1e-6)


def test_bias_changes_selection_not_weights():
    scores, bias = ADVERSARIAL["bias_flips_selection"]
    cfg = tiny_gate_config()
    _, unbiased = select_experts(jnp.asarray(scores, jnp.float32), jnp.zeros(8), cfg)
    weights, biased = select_experts(jnp.asarray(scores, jnp.float32), jnp.asarray(bias, jnp.float32), cfg)
    assert set(np.asarray(unbiased)[0]) != set(np.asarray(biased)[0])
    chosen = np.asarray(biased)[0]
    want = scores[0, chosen] / scores[0, chosen].sum() * cfg.routed_scaling_factor
    np.testing.assert_allclose(np.asarray(weights)[0], want, rtol=1e-6)


@pytest.mark.parametrize("scoring_func, topk_method, norm", [
    ("sigmoid", "noaux_tc", True), ("softmax", "group_limited_greedy", False), ("softmax", "greedy", True)])
def test_gate_random_against_reference(scoring_func, topk_method, norm):
    groups = dict(n_group=4, topk_group=4) if topk_method == "greedy" else {}
    cfg = tiny_gate_config(scoring_func=scoring_func, topk_method=topk_method, norm_topk_prob=norm, **groups)
    logits = np.asarray(jax.random.normal(jax.random.key(0), (64, 8)), np.float64)
    if scoring_func == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
    else:
        scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    bias = np.asarray(jax.random.normal(jax.random.key(1), (8,)) * 0.1) if topk_method == "noaux_tc" else None
    got_w, got_i = select_experts(jnp.asarray(scores, jnp.float32),
                                  None if bias is None else jnp.asarray(bias, jnp.float32), cfg)
    want_w, want_i = route_reference(scores.astype(np.float32).astype(np.float64), bias, cfg)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    np.testing.assert_allclose(np.asarray(got_w), want_w, rtol=1e-5)


def run_moe(cfg, variables, x, valid):
    return MoE(cfg).apply(variables, x, valid)


@pytest.mark.parametrize("tokens", [1, 3, 16, 64])
def test_dense_and_ragged_dispatch_agree(tokens):
    cfg = tiny_gate_config(hidden_size=64)
    x = jax.random.normal(jax.random.key(tokens), (1, tokens, cfg.hidden_size))
    valid = jnp.ones((1, tokens), bool)
    variables = nn.meta.unbox(MoE(cfg).init(jax.random.key(0), x, valid))
    # A bias that keeps the last two experts out of every token's choice: they receive nothing.
    variables["routing"]["gate"]["e_score_correction_bias"] = jnp.array([0, 0, 0, 0, 0, 0, -9.0, -9.0])
    dense_y, dense_stats = run_moe(cfg.replace(moe_dispatch="dense"), variables, x, valid)
    ragged_y, ragged_stats = run_moe(cfg.replace(moe_dispatch="ragged"), variables, x, valid)
    np.testing.assert_allclose(np.asarray(ragged_y), np.asarray(dense_y), atol=1e-5, rtol=1e-5)
    counts = np.asarray(ragged_stats["expert_counts"])
    assert counts.sum() == tokens * cfg.num_experts_per_tok
    assert counts[6] == counts[7] == 0
    np.testing.assert_array_equal(counts, np.asarray(dense_stats["expert_counts"]))


def swiglu_reference(x_MD, sizes_E, w):
    """Expert by expert in float64 over its contiguous rows; rows past the groups give zeros."""
    gate, up, down = (np.asarray(a, np.float64) for a in w)
    x, out, start = np.asarray(x_MD, np.float64), np.zeros(x_MD.shape), 0
    for e, n in enumerate(np.asarray(sizes_E)):
        h = x[start:start + n] @ gate[e]
        out[start:start + n] = (h / (1 + np.exp(-h)) * (x[start:start + n] @ up[e])) @ down[e]
        start += n
    return out


# Group sizes: uneven with empty experts, one expert taking every row, every row in one block's tail,
# every expert one row into a block with all M rows grouped (the most blocks any sizes need: exactly
# num_blocks), rows past the groups (expert parallelism's empty receive slots), a single row.
@pytest.mark.parametrize("sizes", [(37, 0, 90, 1, 0, 3, 50, 19), (200, 0, 0, 0, 0, 0, 0, 0),
                                   (17, 17, 17, 17, 17, 17, 17, 17), (17, 17, 17, 17, 17, 17, 17, 81),
                                   (5, 0, 60, 0, 0, 9, 0, 0), (0, 0, 1, 0, 0, 0, 0, 0)])
def test_blocked_grouped_gemms_match_a_loop_and_ragged_dot(sizes):
    """The CPU form of the grouped GEMMs (experts' rows padded into blocks, model/experts.py): values
    against a float64 loop over experts, values and gradients against lax.ragged_dot."""
    M, (D, F) = 200, (24, 16)
    k = jax.random.split(jax.random.key(len(sizes) + sizes[0]), 4)
    x = jax.random.normal(k[0], (M, D))
    w = (jax.random.normal(k[1], (8, D, F)) / 5, jax.random.normal(k[2], (8, D, F)) / 5,
         jax.random.normal(k[3], (8, F, D)) / 4)
    sizes_E = jnp.asarray(sizes, jnp.int32)

    def ragged(x, w):
        gate, up, down = w
        h = nn.silu(jax.lax.ragged_dot(x, gate, sizes_E)) * jax.lax.ragged_dot(x, up, sizes_E)
        return jax.lax.ragged_dot(h, down, sizes_E)

    blocked = jax.jit(lambda x, w: blocked_swiglu(x, sizes_E, w))
    np.testing.assert_allclose(np.asarray(blocked(x, w)), swiglu_reference(x, sizes_E, w), atol=1e-5, rtol=1e-5)
    probe = jax.random.normal(jax.random.key(9), (M, D))
    grads = [jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * probe), argnums=(0, 1)))(x, w)
             for f in (blocked, ragged)]
    for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_moe_output_against_per_token_loop():
    """The routed+shared output, one token and one chosen expert at a time in float64."""
    cfg = tiny_gate_config(hidden_size=32)
    x = jax.random.normal(jax.random.key(3), (2, 5, cfg.hidden_size))
    valid = jnp.ones((2, 5), bool)
    variables = nn.meta.unbox(MoE(cfg).init(jax.random.key(0), x, valid))
    variables["routing"]["gate"]["e_score_correction_bias"] = jax.random.normal(jax.random.key(4), (8,)) * 0.05
    y, _ = run_moe(cfg, variables, x, valid)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    bias = np.asarray(variables["routing"]["gate"]["e_score_correction_bias"], np.float64)
    xs = np.asarray(x, np.float64).reshape(-1, cfg.hidden_size)
    scores = 1 / (1 + np.exp(-(xs @ p["gate"]["kernel"])))
    weights, indices = route_reference(scores, bias, cfg)

    def swiglu(v, g, u, d):
        a = v @ g
        return ((a / (1 + np.exp(-a))) * (v @ u)) @ d

    e = p["experts"]
    s = p["shared_experts"]
    want = np.stack([
        sum(w * swiglu(xs[n], e["gate_proj"][i], e["up_proj"][i], e["down_proj"][i])
            for w, i in zip(weights[n], indices[n]))
        + swiglu(xs[n], s["gate_proj"]["kernel"], s["up_proj"]["kernel"], s["down_proj"]["kernel"])
        for n in range(len(xs))])
    np.testing.assert_allclose(np.asarray(y).reshape(len(xs), -1), want, atol=1e-5, rtol=1e-4)


def test_padding_is_not_counted():
    cfg = tiny_gate_config(hidden_size=32)
    x = jax.random.normal(jax.random.key(0), (1, 6, cfg.hidden_size))
    valid = jnp.array([[True, True, True, True, False, False]])
    variables = nn.meta.unbox(MoE(cfg).init(jax.random.key(0), x, valid))
    _, stats = run_moe(cfg, variables, x, valid)
    assert float(stats["expert_counts"].sum()) == 4 * cfg.num_experts_per_tok


def test_sequence_balance_loss_reference():
    scores = jax.random.uniform(jax.random.key(0), (2, 5, 8))
    _, idx = jax.lax.top_k(scores, 2)
    valid = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    got = float(sequence_balance_loss(scores, idx, valid))
    s, ix, v = np.asarray(scores, np.float64), np.asarray(idx), np.asarray(valid)
    per_seq = []
    for b in range(2):
        t_valid = [t for t in range(5) if v[b, t]]
        f = np.zeros(8)
        p = np.zeros(8)
        for t in t_valid:
            for e in ix[b, t]:
                f[e] += 8 / (2 * len(t_valid))
            p += s[b, t] / s[b, t].sum() / len(t_valid)
        per_seq.append((f * p).sum())
    assert got == pytest.approx(np.mean(per_seq), rel=1e-5)
    # Perfectly balanced routing with uniform affinities gives exactly 1.
    uniform = jnp.ones((1, 4, 8))
    balanced = jnp.array([[[0, 1], [2, 3], [4, 5], [6, 7]]])
    assert float(sequence_balance_loss(uniform, balanced, jnp.ones((1, 4), bool))) == pytest.approx(1.0)
