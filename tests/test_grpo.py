"""GRPO's objective against NumPy, its gradient against the policy-gradient estimate, rollouts, and one
run of the GRPO job on a micro model (start, resume, outputs)."""

import copy
import csv
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from common import micro_run_config

from deepseek_jax import model
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.rl import config as rl_config
from deepseek_jax.rl import objective, policy, rollout, update
from deepseek_jax.rl.objective import LossSettings
from deepseek_jax.rl.sft import sft_batch, train_sft
from deepseek_jax.rl.tasks import Example
from deepseek_jax.rl.trainer import train_grpo
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.optimizer import make_optimizer

G = 4
L = 7  # Dr. GRPO's constant (the generation budget).


def numpy_grpo_loss(rewards, logp, old, ref, mask, loss_type, clip_low, clip_high, beta, eps=1e-4):
    """The formula written out with loops, in float64 (advantages without any special case)."""
    N, T = logp.shape
    adv = np.zeros(N)
    for g in range(N // G):
        r = rewards[g * G:(g + 1) * G]
        a = r - r.mean()
        if loss_type != "dr_grpo":
            a = a / (r.std(ddof=1) + eps)
        adv[g * G:(g + 1) * G] = a
    sums, counts = np.zeros(N), np.zeros(N)
    for n in range(N):
        for t in range(T):
            if mask[n, t]:
                rho = math.exp(logp[n, t] - old[n, t])
                surrogate = min(rho * adv[n], min(max(rho, 1 - clip_low), 1 + clip_high) * adv[n])
                d = ref[n, t] - logp[n, t]
                sums[n] += -surrogate + beta * (math.exp(d) - d - 1)
                counts[n] += 1
    if loss_type == "grpo":  # Per sequence, then per group, then over groups.
        return np.mean([np.mean([sums[n] / counts[n] for n in range(g * G, (g + 1) * G)]) for g in range(N // G)])
    if loss_type == "dapo":
        return sums.sum() / counts.sum()
    return sums.sum() / (N * L)


def hand_made_batch():
    """3 groups of 4: rewards of both signs, one group of identical rewards; completions of different
    lengths after prompts of different lengths, then padding."""
    rng = np.random.default_rng(0)
    rewards = np.array([1.0, 0.0, 0.5, 1.1, 2.0, 2.0, 2.0, 2.0, -1.0, 0.0, 0.0, 3.0])
    N, T = len(rewards), 9
    starts = rng.integers(0, 3, N)
    ends = np.minimum(starts + rng.integers(1, L + 1, N), T)
    mask = (np.arange(T)[None, :] >= starts[:, None]) & (np.arange(T)[None, :] < ends[:, None])
    logp = -rng.uniform(0.05, 3.0, (N, T))
    old = logp + rng.uniform(-0.5, 0.5, (N, T))  # Ratios from 0.6 to 1.6: both clips are hit.
    ref = logp + rng.uniform(-1.0, 1.0, (N, T))
    return rewards, logp, old, ref, mask


@pytest.mark.parametrize("loss_type", objective.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.2, 0.28)])
def test_loss_matches_numpy(loss_type, beta, clip):
    rewards, logp, old, ref, mask = hand_made_batch()
    settings = LossSettings(loss_type=loss_type, clip_low=clip[0], clip_high=clip[1], kl_beta=beta,
                            max_completion_tokens=L)
    adv = objective.group_advantages(rewards, G, settings)
    np.testing.assert_array_equal(np.asarray(adv[4:8]), 0.0)  # Identical rewards: exactly 0, no NaN.
    outside = lambda x: jnp.asarray(np.where(mask, x, 5.0), jnp.float32)  # noqa: E731  (junk off the mask)
    loss, metrics = objective.grpo_loss(outside(logp), adv, jnp.asarray(mask), settings, outside(old),
                                        outside(ref) if beta else None)
    expected = numpy_grpo_loss(rewards, logp, old, ref, mask, loss_type, *clip, beta)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5, atol=1e-6)
    rho = np.exp(logp - old)
    a = np.repeat(np.asarray(adv, np.float64)[:, None], logp.shape[1], axis=1)
    clipped = ((rho > 1 + clip[1]) & (a > 0)) | ((rho < 1 - clip[0]) & (a < 0))
    assert 0 < float(metrics["clip_fraction"]) < 1
    np.testing.assert_allclose(float(metrics["clip_fraction"]), clipped[mask].mean(), rtol=1e-6)


def test_all_groups_tied_gives_a_zero_finite_loss_and_gradient():
    settings = LossSettings(loss_type="grpo", kl_beta=0.0)
    adv = objective.group_advantages(np.full(8, 0.7), G, settings)
    mask = jnp.ones((8, 5))
    grad = jax.grad(lambda lp: objective.grpo_loss(lp, adv, mask, settings)[0])(jnp.full((8, 5), -1.0))
    assert np.all(np.asarray(adv) == 0) and np.all(np.asarray(grad) == 0)


# --- the gradient, and scoring with the model --------------------------------------------------------

def completion_batch(vocab, seed=0):
    """2 groups of G: random prompt/completion lengths inside W = 12 positions."""
    rng = np.random.default_rng(seed)
    N, W = 2 * G, 12
    prompt_lengths = rng.integers(1, 4, N)
    lengths = prompt_lengths + rng.integers(1, W - 3, N)
    tokens = rng.integers(0, vocab, (N, W)).astype(np.int32)
    r = rollout.Rollouts(examples=[Example("p", "a")] * N, completions=[""] * N, tokens=tokens,
                         prompt_lengths=prompt_lengths.astype(np.int32), lengths=lengths.astype(np.int32),
                         truncated=np.zeros(N, bool))
    return r, rng.normal(size=N)


def explicit_logprobs(logits_NWV, r, temperature=1.0):
    """(row of each completion token [K], log pi of it [K]), indices written out: the token at p is
    predicted by the logits at p - 1."""
    index = [(n, p) for n in range(len(r.lengths)) for p in range(r.prompt_lengths[n], r.lengths[n])]
    rows, positions = (np.array(x) for x in zip(*index))
    logp_all = jax.nn.log_softmax(logits_NWV / temperature, axis=-1)
    return rows, logp_all[rows, positions - 1, r.tokens[rows, positions]]


def test_scoring_mask_marks_exactly_the_completion_tokens():
    r, _ = completion_batch(50)
    arrays = rollout.scoring_arrays(r)
    for n in range(len(r.lengths)):
        expected = np.zeros(r.tokens.shape[1] - 1)
        expected[r.prompt_lengths[n] - 1:r.lengths[n] - 1] = 1
        np.testing.assert_array_equal(arrays["mask"][n], expected)
        np.testing.assert_array_equal(arrays["segment_ids"][n], np.arange(r.tokens.shape[1]) < r.lengths[n])


@pytest.mark.parametrize("loss_type", objective.LOSS_TYPES)
def test_gradient_at_the_old_policy_is_the_policy_gradient(loss_type):
    """mu = 1, pi = pi_old = pi_ref: d loss / d logits is that of -sum_n c_n A_n log pi(o_n), with the
    loss type's normaliser c_n (the KL term's gradient vanishes there). Through the logits, so equal for
    any parameters by the chain rule."""
    V, temperature = 11, 0.7
    r, rewards = completion_batch(V)
    logits = jnp.asarray(np.random.default_rng(1).normal(size=r.tokens.shape + (V,)), jnp.float32)
    settings = LossSettings(loss_type=loss_type, clip_low=0.2, clip_high=0.28, kl_beta=0.04, max_completion_tokens=L)
    batch = {k: jnp.asarray(v) for k, v in rollout.scoring_arrays(r).items()}
    batch["advantages"] = objective.group_advantages(rewards, G, settings)
    current = update.logprobs_from_logits(logits, batch["tokens"], temperature)[0]
    batch.update(old_logp=current, ref_logp=current)
    grad = jax.grad(lambda x, b: update.policy_loss(x, b, settings, temperature)[0])
    lengths = (r.lengths - r.prompt_lengths).astype(np.float64)
    adv = np.asarray(batch["advantages"], np.float64)
    weight = {"grpo": adv / lengths / len(adv), "dapo": adv / lengths.sum(), "dr_grpo": adv / (len(adv) * L)}[loss_type]

    def policy_gradient_objective(x):
        rows, logp = explicit_logprobs(x, r, temperature)
        return -jnp.sum(jnp.asarray(weight[rows], jnp.float32) * logp)

    expected = jax.grad(policy_gradient_objective)(logits)
    assert float(jnp.abs(expected).max()) > 1e-3  # Not a vacuous comparison.
    np.testing.assert_allclose(np.asarray(grad(logits, batch)), np.asarray(expected), rtol=1e-4, atol=1e-7)
    del batch["old_logp"]  # mu = 1 needs no old log-probs: the same gradient.
    np.testing.assert_allclose(np.asarray(grad(logits, batch)), np.asarray(expected), rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The micro model without MTP, with variables drawn on the host (no init program to compile)."""
    config = micro_run_config(tmp_path_factory.mktemp("micro"), write_corpus=False)
    config.model.update(num_nextn_predict_layers=0, moe_dispatch="dense", num_hidden_layers=1)
    cfg = ModelConfig.from_dict(config.model)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if "scale" in jax.tree_util.keystr(path) else 0.05 * noise)

    return cfg, jax.tree_util.tree_map_with_path(draw, model.abstract_variables(cfg))


def test_scores_are_the_models_next_token_logprobs(micro):
    """score() == log-softmax of the plain model forward (no segment ids) at each completion token: the
    padding segments and the alignment change nothing (attention is causal, the padding comes after)."""
    cfg, variables = micro
    r, _ = completion_batch(256)
    batch = {k: jnp.asarray(v) for k, v in rollout.scoring_arrays(r).items()}
    scores = np.asarray(update.score(variables, batch, cfg=cfg, temperature=1.0))
    mask = np.asarray(batch["mask"])
    rows, plain = explicit_logprobs(model.forward(cfg, variables, jnp.asarray(r.tokens)), r)
    for n in range(len(r.lengths)):
        np.testing.assert_allclose(scores[n][mask[n] == 1], np.asarray(plain)[rows == n], rtol=1e-5, atol=1e-5)


# --- the job --------------------------------------------------------------------------------------------

def micro_grpo_config(tmp_path, **rl_overrides):
    base = micro_run_config(tmp_path, write_corpus=False)
    config = rl_config.grpo_base_config()
    config.model, config.data = base.model, base.data  # The data group only supplies the tokenizer.
    # One dense layer (cheap to compile) and the micro model's MTP module, a MoE block GRPO never runs.
    config.model.update(moe_dispatch="dense", num_hidden_layers=1)
    config.rl.task.update(digits=1, operations="+", num_eval=6)
    config.rl.update(prompts_per_step=2, group_size=3, updates_per_batch=2, max_prompt_tokens=4, max_new_tokens=40,
                     eval_every=1, eval_batch_size=4, kl_beta=0.04)
    config.rl.update(**rl_overrides)
    config.train.update(steps=1, warmup_steps=0, learning_rate=1e-3)
    config.checkpoint.update(every=1, async_save=False)
    return config


def test_config_errors_name_the_field(tmp_path):
    for key, value, match in [("group_size", 1, "rl.group_size"), ("temperature", 0.0, "rl.temperature"),
                              ("loss_type", "ppo", "rl.loss_type"), ("clip_low", 1.5, "rl.clip_low"),
                              ("max_new_tokens", 61, "max_position_embeddings")]:
        config = micro_grpo_config(tmp_path, **{key: value})
        with pytest.raises(ValueError, match=match):
            rl_config.validate_rl_config(config)
    config = micro_grpo_config(tmp_path)
    config.rl.sft.batch_size = 0
    with pytest.raises(ValueError, match="rl.sft.batch_size"):
        rl_config.validate_rl_config(config)
    config = micro_grpo_config(tmp_path)
    config.rl.task.update(kind="jsonl", num_test=5)
    with pytest.raises(ValueError, match="rl.task.num_test.*no generated test split"):
        rl_config.validate_rl_config(config)
    config = micro_grpo_config(tmp_path)
    config.rl.task.unlocked_typo = 1
    with pytest.raises(ValueError, match=r"config.rl.task=\['unlocked_typo'\].*unknown or missing keys"):
        rl_config.validate_rl_config(config)
    config = micro_grpo_config(tmp_path, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="rl.init_from.*neither a training run"):
        policy.load_policy(config, ModelConfig.from_dict(config.model))
    config = micro_grpo_config(tmp_path, max_prompt_tokens=3)  # "9+9=" is 4 bytes.
    with pytest.raises(ValueError, match="rl.max_prompt_tokens=3"):
        train_grpo(config, str(tmp_path / "run"))


def test_starting_policy_from_a_training_checkpoint(tmp_path, micro):
    cfg, variables = micro
    config = micro_grpo_config(tmp_path, init_from=str(tmp_path / "sft"))
    config.model = ml_collections.ConfigDict(cfg.to_dict())
    tx = make_optimizer(config.train)
    state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                         jax.eval_shape(lambda: step_lib.init_state(cfg, tx, jax.random.key(0))))
    state = state.replace(params=variables["params"], routing=variables["routing"])
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "sft" / "checkpoints"), keep=1, async_save=False)
    ckpt.save(7, state, ema=None, data_state={}, model_config=cfg)
    ckpt.close()
    loaded, where = policy.load_policy(config, cfg)
    assert "step 7" in where
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    config.model.hidden_size = 64
    with pytest.raises(checkpoint_lib.CheckpointError, match="hidden_size"):
        policy.load_policy(config, ModelConfig.from_dict(config.model))


def test_rollouts_group_completions_per_prompt(micro):
    cfg, variables = micro
    from deepseek_jax.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    examples = [Example("1+2=", "3"), Example("9+9=", "18")]
    r = rollout.sample(cfg, variables, tok, examples, group_size=3, max_prompt_tokens=4, max_new_tokens=5,
                       temperature=1.0, key=jax.random.key(0))
    assert r.tokens.shape == (6, 9) and [e.prompt for e in r.examples] == ["1+2="] * 3 + ["9+9="] * 3
    np.testing.assert_array_equal(r.tokens[:3, :4], np.tile(tok.encode("1+2="), (3, 1)))
    for n in range(6):
        generated = r.tokens[n, 4:r.lengths[n]]
        assert r.truncated[n] == (tok.eos_id not in generated) and r.completion_lengths[n] == len(generated)
        assert r.completions[n] == tok.decode(generated[generated != tok.eos_id], skip_special_tokens=True)
    assert len({tuple(row) for row in r.tokens[:3]}) > 1  # Different samples within a group.


def test_sft_batch_is_prompt_solution_end_then_padding():
    from deepseek_jax.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    examples = [Example("1+2=", "3", "<a>3</a>"), Example("10+2=", "12", "<a>12</a>")]
    batch = sft_batch(tok, examples, max_prompt_tokens=5, max_new_tokens=10)
    row = list(tok.encode("1+2=<a>3</a>")) + [tok.eos_id]
    np.testing.assert_array_equal(batch["tokens"][0], row + [tok.pad_id] * (15 - len(row)))
    np.testing.assert_array_equal(batch["mask"][0], [0, 0, 0] + [1] * 9 + [0] * 2)  # Predicting "<a>3</a>" + eos.
    assert batch["mask"][1].sum() == len("<a>12</a>") + 1
    with pytest.raises(ValueError, match="rl.max_new_tokens=8"):
        sft_batch(tok, examples, max_prompt_tokens=5, max_new_tokens=8)
    with pytest.raises(ValueError, match="no worked solution"):
        sft_batch(tok, [Example("1+2=", "3")], max_prompt_tokens=5, max_new_tokens=8)


def test_sft_then_grpo_jobs_run_write_their_outputs_and_resume(tmp_path):
    """A supervised step from random weights, then GRPO from that checkpoint (mu = 2, beta > 0, a model
    with an MTP module GRPO does not run), then GRPO resumed for one more step."""
    sft_dir, grpo_dir = str(tmp_path / "sft"), str(tmp_path / "grpo")
    config = micro_grpo_config(tmp_path)
    config.rl.sft.update(steps=1, batch_size=2, warmup_steps=0)
    assert train_sft(config, sft_dir)["steps"] == 1
    config.rl.init_from = sft_dir
    summary = train_grpo(config, grpo_dir)
    assert summary["policy_source"] == f"{sft_dir} step 1"
    with open(os.path.join(grpo_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    row = rows[-1]
    for name in ("reward", "reward_accuracy", "reward_share_format", "accuracy", "zero_variance_groups",
                 "completion_length", "kl", "clip_fraction", "entropy", "loss", "eval_accuracy"):
        assert row[name] != "" and np.isfinite(float(row[name])), name
    assert float(row["entropy"]) > 0 and float(row["completion_length"]) > 0
    assert float(row["kl"]) >= 0 and summary["steps"] == 1
    for name in ("reward.png", "summary.json", "config.json"):
        assert os.path.isfile(os.path.join(grpo_dir, name)), name
    config.train.steps = 2
    saved_config = pathlib.Path(grpo_dir, "config.json").read_text()
    changed = copy.deepcopy(config)
    changed.rl.group_size += 1
    refused = r"rl.group_size: checkpoint 3 vs config 4.*--config.checkpoint.allow_changes=rl.group_size\.$"
    with pytest.raises(checkpoint_lib.CheckpointError, match=refused):
        train_grpo(changed, grpo_dir)  # the batch of rollouts would change shape mid-run
    assert pathlib.Path(grpo_dir, "config.json").read_text() == saved_config
    summary = train_grpo(config, grpo_dir)
    assert summary["start_step"] == 1 and summary["steps"] == 2
