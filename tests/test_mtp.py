"""Multi-Token Prediction: loss masks at the row's end, shared embedding/head, causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import model_config

from deepseek_jax import model
from deepseek_jax.train import losses

apply = jax.jit(model.apply, static_argnums=0)


@pytest.fixture(scope="module")
def tiny():
    cfg = model_config(hidden_size=64, num_nextn_predict_layers=2)
    return cfg, model.init(cfg, jax.random.key(0))


def test_shifted_targets_never_reach_past_the_row():
    tokens = jnp.array([[10, 11, 12, 13, 14, 15]])
    segments = jnp.array([[1, 1, 1, 2, 2, 0]])
    labels, mask = losses.shifted_targets(tokens, segments, 2)
    # Position i predicts i + 2: rows 0 -> 12 (same doc), 1 -> 13 (other doc), 2 -> 14 (other doc),
    # 3 -> 15 (padding), 4 and 5 -> past the end.
    np.testing.assert_array_equal(np.asarray(mask), [[1, 0, 0, 0, 0, 0]])
    assert int(labels[0, 0]) == 12
    _, too_far = losses.shifted_targets(tokens, segments, 6)
    assert float(too_far.sum()) == 0


def test_mtp_loss_uses_no_position_without_a_label(tiny):
    """d(loss)/d(logits) is exactly zero wherever the label would lie beyond the row."""
    cfg, variables = tiny
    T = 7
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
    segments = jnp.ones_like(tokens)
    out = apply(cfg, variables, tokens)
    grads = jax.grad(lambda lg: losses.mtp_losses(lg, tokens, segments)[0].sum())(out.mtp_logits)
    touched = np.asarray(jnp.abs(grads).sum(axis=(1, 3)) > 0)  # [P, T]
    for k in range(cfg.num_nextn_predict_layers):  # Depth k (0-based) predicts token i + k + 2.
        np.testing.assert_array_equal(touched[k], np.arange(T) < T - (k + 2))
    sums, counts = losses.mtp_losses(out.mtp_logits, tokens, segments)
    np.testing.assert_array_equal(np.asarray(counts), [2 * (T - 2), 2 * (T - 3)])


def test_embedding_and_head_are_shared_and_get_gradients_from_both_paths(tiny):
    cfg, variables = tiny
    for k in range(cfg.num_nextn_predict_layers):
        names = set(variables["params"][f"mtp_{k}"])
        assert names == {"enorm", "hnorm", "eh_proj", "block", "norm"}  # No embedding or head copy.
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, cfg.vocab_size)
    segments = jnp.ones_like(tokens)

    def main_loss(params):
        out = apply(cfg, {**variables, "params": params}, tokens)
        return losses.next_token_loss(out.logits, tokens, segments)[0]

    def mtp_loss(params):
        out = apply(cfg, {**variables, "params": params}, tokens)
        return losses.mtp_losses(out.mtp_logits, tokens, segments)[0].sum()

    for loss in (main_loss, mtp_loss):
        g = jax.grad(loss)(variables["params"])
        assert float(jnp.abs(g["embed_tokens"]["embedding"]).sum()) > 0
        assert float(jnp.abs(g["lm_head"]["kernel"]).sum()) > 0
    # The main loss does not reach the MTP modules (they sit after the head's input):
    g_main = jax.grad(main_loss)(variables["params"])
    assert all(float(jnp.abs(v).sum()) == 0 for v in jax.tree.leaves(g_main["mtp_0"]))


def test_causality_main_and_mtp(tiny):
    """Changing token j changes no main logit before j and no depth-k MTP logit before j - k."""
    cfg, variables = tiny
    T = 10
    tokens = jax.random.randint(jax.random.key(3), (1, T), 0, cfg.vocab_size)
    base = apply(cfg, variables, tokens)
    for j in (3, 7):
        changed = tokens.at[0, j].set((tokens[0, j] + 1) % cfg.vocab_size)
        out = apply(cfg, variables, changed)
        np.testing.assert_array_equal(np.asarray(out.logits[0, :j]), np.asarray(base.logits[0, :j]))
        assert not np.allclose(np.asarray(out.logits[0, j]), np.asarray(base.logits[0, j]))
        for k in range(cfg.num_nextn_predict_layers):  # Depth k (0-based) reads tokens up to i + k + 1.
            first_affected = j - (k + 1)
            np.testing.assert_array_equal(np.asarray(out.mtp_logits[k, 0, :first_affected]),
                                          np.asarray(base.mtp_logits[k, 0, :first_affected]))
            assert not np.allclose(np.asarray(out.mtp_logits[k, 0, first_affected]),
                                   np.asarray(base.mtp_logits[k, 0, first_affected]))
