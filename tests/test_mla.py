"""MLA and YaRN RoPE against independent float64 NumPy implementations (explicit per-head loops)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import model_config, to_f64

from deepseek_jax.model import mla, rope
from deepseek_jax.model.mla import MLA, attention_mask

YARN = dict(type="yarn", factor=40.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
            mscale=1.0, mscale_all_dim=1.0)


def yarn_inv_freq_reference(dim, base, scaling):
    """YaRN frequencies written pair by pair from the paper's definitions."""
    out = []
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

    def dim_for_rotations(n):
        return dim * math.log(original / (n * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for_rotations(scaling["beta_fast"])), 0)
    high = min(math.ceil(dim_for_rotations(scaling["beta_slow"])), dim - 1)
    for j in range(dim // 2):
        theta = base ** (-2 * j / dim)
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)  # 0: keep, 1: interpolate.
        out.append(theta * (1 - ramp) + theta / factor * ramp)
    return np.array(out)


def rotate_reference(v, pos, inv_freq, magnitude):
    z = (v[0::2] + 1j * v[1::2]) * np.exp(1j * pos * inv_freq) * magnitude
    out = np.empty_like(v)
    out[0::2], out[1::2] = z.real, z.imag
    return out


def rms(v, w, eps):
    return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w


def mla_reference(p, x, positions, segments, cfg):
    """Float64, one head, one query, one key at a time. Returns [B, T, D]; padding rows are zero."""
    B, T, _ = x.shape
    H, K, R, V, C = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                     cfg.kv_lora_rank)
    latent_eps = 1e-6  # Fixed in DeepSeek's code for the q/kv latent norms.
    if cfg.q_lora_rank is None:
        q = x @ p["q_proj"]["kernel"]
    else:
        q = rms(x @ p["q_a_proj"]["kernel"], p["q_a_layernorm"]["scale"], latent_eps) @ p["q_b_proj"]["kernel"]
    q = q.reshape(B, T, H, K + R)
    kv = x @ p["kv_a_proj_with_mqa"]["kernel"]
    latent = rms(kv[..., :C], p["kv_a_layernorm"]["scale"], latent_eps)
    k_rope = kv[..., C:]
    up = (latent @ p["kv_b_proj"]["kernel"]).reshape(B, T, H, K + V)
    if cfg.rope_scaling is None:
        inv_freq = np.array([cfg.rope_theta ** (-2 * j / R) for j in range(R // 2)])
        magnitude, scale = 1.0, (K + R) ** -0.5
    else:
        inv_freq = yarn_inv_freq_reference(R, cfg.rope_theta, cfg.rope_scaling)
        m = 0.1 * cfg.rope_scaling["mscale_all_dim"] * math.log(cfg.rope_scaling["factor"]) + 1
        magnitude, scale = 1.0, (K + R) ** -0.5 * m * m  # mscale == mscale_all_dim: cos/sin unscaled.
    heads = np.zeros((B, T, H * V))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                if segments[b, t] == 0:
                    continue
                q_rot = rotate_reference(q[b, t, h, K:], positions[b, t], inv_freq, magnitude)
                keys = [s for s in range(t + 1) if segments[b, s] == segments[b, t]]
                logits = np.array([
                    (q[b, t, h, :K] @ up[b, s, h, :K]
                     + q_rot @ rotate_reference(k_rope[b, s], positions[b, s], inv_freq, magnitude)) * scale
                    for s in keys])
                weights = np.exp(logits - logits.max())
                weights /= weights.sum()
                heads[b, t, h * V:(h + 1) * V] = sum(w * up[b, s, h, K:] for w, s in zip(weights, keys))
    out = heads @ p["o_proj"]["kernel"]
    return out * (segments != 0)[..., None]


# query_chunk 4: self-attention in blocks of 4 queries (4, 4, 1), the document boundary of row 1 on a block
# edge and its padding inside the last two blocks; 128: one block.
@pytest.mark.parametrize("q_lora_rank, rope_scaling, query_chunk", [
    (96, None, 128), (None, None, 128), (96, YARN, 128), (None, YARN, 128), (96, None, 4), (None, YARN, 4)])
def test_mla_matches_float64_reference(q_lora_rank, rope_scaling, query_chunk, monkeypatch):
    monkeypatch.setattr(mla, "QUERY_CHUNK", query_chunk)
    cfg = model_config(q_lora_rank=q_lora_rank, rope_scaling=rope_scaling, hidden_size=64)
    B, T = 2, 9
    x = jax.random.normal(jax.random.key(0), (B, T, cfg.hidden_size), jnp.float32)
    # Row 0: one document with positions offset (as after packing); row 1: two documents then padding.
    positions = np.array([np.arange(T) + 100, [0, 1, 2, 3, 0, 1, 2, 0, 0]])
    segments = np.array([[1] * T, [1, 1, 1, 1, 2, 2, 2, 0, 0]])
    module = MLA(cfg)
    variables = nn.meta.unbox(module.init(jax.random.key(1), x, positions, segments))
    # Perturb the norms so that a mix-up of the two RMSNorm scales would show.
    variables = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), variables)
    out, _, _ = module.apply(variables, x, positions, segments)  # No cache: no entries, no indexer loss.
    ref = mla_reference(to_f64(variables["params"]), np.asarray(x, np.float64), positions, segments, cfg)
    valid = segments != 0
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=2e-5, rtol=1e-4)


def test_yarn_frequencies_and_scales():
    got = rope.inverse_frequencies(64, 10000.0, YARN)
    np.testing.assert_allclose(got, yarn_inv_freq_reference(64, 10000.0, YARN), rtol=1e-12)
    plain = rope.inverse_frequencies(64, 10000.0, None)
    assert got[0] == plain[0] and got[-1] == pytest.approx(plain[-1] / 40)  # Fast kept, slow interpolated.
    # DeepSeek-V3's numbers: mscale(40, 1) = 1 + 0.1 ln 40, and the logit scale is 192^-0.5 * mscale^2.
    assert rope.yarn_mscale(40.0, 1.0) == pytest.approx(1.3688879454113936)
    v3 = dict(YARN, original_max_position_embeddings=4096)
    assert rope.softmax_scale(192, v3) == pytest.approx(192 ** -0.5 * 1.3688879454113936 ** 2)
    assert rope.rotation_magnitude(dict(v3, mscale=0.707, mscale_all_dim=0.707)) == pytest.approx(1.0)


def test_rotation_is_interleaved_pairs():
    x = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
    pos = jnp.array([[0, 5, 17]])
    cos, sin = rope.cos_sin(pos, 8, 10000.0, None)
    got = np.asarray(rope.apply_rotary(x, cos, sin))
    inv = rope.inverse_frequencies(8, 10000.0, None)
    for t in range(3):
        for h in range(2):
            want = rotate_reference(np.asarray(x[0, t, h], np.float64), int(pos[0, t]), inv, 1.0)
            np.testing.assert_allclose(got[0, t, h], want, atol=1e-5)


def test_attention_mask_is_causal_within_documents():
    segments = jnp.array([[1, 1, 2, 2, 0]])
    mask = np.asarray(attention_mask(segments))[0, 0]
    want = np.array([[1, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [0, 0, 1, 0, 0],
                     [0, 0, 1, 1, 0],
                     [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask, want)
