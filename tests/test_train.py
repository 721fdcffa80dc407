"""The training job: optimizer, loss-free balancing, NaN guard, remat, EMA, resume, checkpoints, SIGTERM."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from common import ROOT, config, losses_by_step, micro_run_config, read_rows

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.train import balance, checkpoint, optimizer
from deepseek_jax.train import step as step_lib
from deepseek_jax.train.ema import HostEMA
from deepseek_jax.train.evaluation import evaluate_checkpoint
from deepseek_jax.train.loop import TrainingStopped
from deepseek_jax.train.pretrain import train_and_evaluate

# --- optimizer ---------------------------------------------------------------------------------------

def test_schedule_warms_up_holds_then_decays(tmp_path):
    t = micro_run_config(tmp_path, steps=100, warmup_steps=10, decay_start=0.5, final_lr_fraction=0.1).train
    lr = optimizer.learning_rate_schedule(t)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(t.learning_rate / 2)
    assert float(lr(10)) == float(lr(49)) == pytest.approx(t.learning_rate)
    assert float(lr(75)) == pytest.approx(t.learning_rate * (0.1 + 0.9 * 0.5), rel=1e-5)
    assert float(lr(100)) == pytest.approx(t.learning_rate * 0.1, rel=1e-5)


def test_weight_decay_skips_norms(tmp_path):
    params = {"layer": {"kernel": jnp.ones((2, 3)), "norm": {"scale": jnp.ones((4, 3))}}, "bias": jnp.ones(3)}
    mask = optimizer.decay_mask(params)
    assert mask == {"layer": {"kernel": True, "norm": {"scale": False}}, "bias": False}


# --- loss-free balancing -----------------------------------------------------------------------------

def test_bias_moves_against_the_load():
    routing = {"moe_layers": {"mlp": {"gate": {"e_score_correction_bias": jnp.zeros((2, 4))}}}}
    stats = {"moe_layers": {"expert_counts": jnp.array([[10.0, 2, 2, 2], [4, 4, 4, 4]])}}
    new = balance.update_biases(routing, stats, 0.01)
    bias = np.asarray(new["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"])
    np.testing.assert_allclose(bias, [[-0.01, 0.01, 0.01, 0.01], [0, 0, 0, 0]])
    np.testing.assert_allclose(np.asarray(balance.max_violation(stats["moe_layers"]["expert_counts"])),
                               [10 / 4 - 1, 0.0])


def test_step_updates_bias_without_gradient(tmp_path):
    c = micro_run_config(tmp_path, bias_update_speed=0.5)
    cfg = ModelConfig.from_dict(c.model)
    tx = optimizer.make_optimizer(c.train)
    state = step_lib.init_state(cfg, tx, jax.random.key(0))
    batch = micro_batch(cfg)
    new, metrics = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, train_cfg=c.train, tx=tx))(state, batch)
    bias = jax.tree.leaves(new.routing["moe_layers"])[0]
    assert set(np.unique(np.abs(np.asarray(bias)))) <= {0.0, 0.5} and float(jnp.abs(bias).sum()) > 0
    assert "e_score_correction_bias" not in str(jax.tree_util.tree_structure(new.params))
    assert float(metrics["max_vio"]) >= 0


def micro_batch(cfg, B=2, T=16, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, 256)
    return {"tokens": tokens, "segment_ids": jnp.ones((B, T), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}


# --- NaN guard ---------------------------------------------------------------------------------------

def test_non_finite_step_is_skipped_and_counted(tmp_path):
    c = micro_run_config(tmp_path)
    cfg = ModelConfig.from_dict(c.model)
    tx = optimizer.make_optimizer(c.train)
    state = step_lib.init_state(cfg, tx, jax.random.key(0))
    step = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, train_cfg=c.train, tx=tx))
    poisoned = state.replace(params={**state.params, "embed_tokens": {
        "embedding": state.params["embed_tokens"]["embedding"].at[:].set(1e38)}})  # RMSNorm overflows.
    after, metrics = step(poisoned, micro_batch(cfg))
    assert not bool(metrics["finite"])
    assert int(after.skipped_steps) == 1 and int(after.bad_steps) == 1 and int(after.step) == 1
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state, after.routing)),
                    jax.tree.leaves((poisoned.params, poisoned.opt_state, poisoned.routing))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    healthy, metrics = step(state, micro_batch(cfg))
    assert bool(metrics["finite"]) and int(healthy.bad_steps) == 0


def test_run_stops_after_consecutive_bad_steps(tmp_path):
    """The saves made before the stop (every 2 steps), the last one still in flight when the run stops,
    are committed, and the message names the last."""
    c = micro_run_config(tmp_path, learning_rate=1e30, warmup_steps=0, steps=20, max_bad_steps=3,
                         ema_decay=0.0)
    c.checkpoint.every = 2
    checkpoints = tmp_path / "run" / "checkpoints"
    with pytest.raises(TrainingStopped, match=r"3 consecutive steps with a NaN/Inf") as stopped:
        train_and_evaluate(c, str(tmp_path / "run"))
    last = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    assert str(stopped.value).endswith(f"the last committed checkpoint is {checkpoints / str(last)}, untouched.")


# --- remat -------------------------------------------------------------------------------------------

def test_remat_policies_give_identical_gradients(tmp_path):
    c = micro_run_config(tmp_path)
    base = ModelConfig.from_dict(c.model)
    tx = optimizer.make_optimizer(c.train)
    state = step_lib.init_state(base, tx, jax.random.key(0))
    batch = micro_batch(base)

    def grads(policy):
        cfg = base.replace(remat=policy)
        fn = jax.grad(lambda p: step_lib.loss_and_metrics(p, state.routing, batch, state.step, cfg, c.train)[0])
        return jax.jit(fn)(state.params)

    # Same math; XLA fuses the recomputed graph differently, so equal up to float32 reassociation
    # (observed: 5e-6 relative on a handful of elements), not bit for bit.
    reference = grads("none")
    for policy in ("deepseek", "full"):
        chex.assert_trees_all_close(grads(policy), reference, rtol=2e-5, atol=1e-8)


def test_deepseek_policy_recomputes_norms_and_up_projections(tmp_path):
    """No residual a decoder block saves under the 'deepseek' policy is an RMSNorm output or an MLA
    up-projection; a control policy that keeps exactly those shows the check can see them."""
    import contextlib
    import io

    import flax.linen as nn

    from deepseek_jax.model import remat
    from deepseek_jax.model.block import Block

    cfg = ModelConfig.from_dict(micro_run_config(tmp_path).model)
    batch = micro_batch(cfg)
    x = jax.random.normal(jax.random.key(0), (*batch["tokens"].shape, cfg.hidden_size))
    args = (batch["positions"], batch["segment_ids"])
    variables = Block(cfg, moe=True).init(jax.random.key(1), x, *args)

    def saved(policy):
        block = nn.remat(Block, policy=policy)(cfg, moe=True)
        f = lambda v: block.apply(v, x, *args)[0].sum()  # noqa: E731
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            jax.ad_checkpoint.print_saved_residuals(f, variables)
        return out.getvalue()

    control = saved(jax.checkpoint_policies.save_only_these_names(remat.RMSNORM, remat.MLA_UP_PROJ))
    deepseek = saved(remat.POLICIES["deepseek"])
    assert "named 'rmsnorm'" in control and "named 'mla_up_proj'" in control
    assert "named 'rmsnorm'" not in deepseek and "named 'mla_up_proj'" not in deepseek
    assert "RMSNorm.__call__" not in deepseek  # Nor any piece of a norm saved in the output's place.
    assert "named 'linear'" in deepseek and "named 'routed_experts'" in deepseek


# --- EMA ---------------------------------------------------------------------------------------------

def test_host_ema_matches_numpy():
    params = {"w": jnp.ones((3,))}
    ema = HostEMA(params, 0.9)
    for value in (2.0, 4.0):
        ema.update({"w": jnp.full((3,), value)})
    expected = 0.9 * (0.9 * 1 + 0.1 * 2) + 0.1 * 4
    np.testing.assert_allclose(ema.value()["w"], np.full(3, expected), rtol=1e-6)
    assert isinstance(ema.value()["w"], np.ndarray)  # Host memory, not a device array.
    ema.close()


# --- the job: outputs, resume, checkpoints -----------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    c = micro_run_config(tmp)
    workdir = str(tmp / "run")
    summary = train_and_evaluate(c, workdir)
    return c, workdir, summary


def test_run_writes_its_outputs(full_run):
    c, workdir, summary = full_run
    for name in ("metrics.csv", "loss.png", "config.json", "summary.json", "tensorboard", "checkpoints"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    rows = read_rows(workdir)
    # One MoE layer and one MTP block in the micro model: MaxVio per layer and their mean.
    assert {"step", "loss", "mtp_loss", "max_vio", "max_vio_per_layer_0", "max_vio_per_layer_1",
            "eval_bpb"} <= set(rows[0])
    assert sorted(losses_by_step(workdir)) == list(range(1, 7))
    assert summary["steps"] == 6 and summary["final_eval_bpb"] < summary["initial_eval_bpb"]


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(full_run, tmp_path):
    c, workdir, _ = full_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))  # Back to the step-3 checkpoint, as after a kill.
    summary = train_and_evaluate(c, resumed)
    assert summary["start_step"] == 3
    assert losses_by_step(resumed) == losses_by_step(workdir)  # Exact strings: bit for bit.
    # The rows steps 4-6 logged before the "kill" are replaced, not repeated.
    assert [r["step"] for r in read_rows(resumed)] == [r["step"] for r in read_rows(workdir)]
    original = evaluate_checkpoint(c, workdir, step=6)
    again = evaluate_checkpoint(c, resumed, step=6)
    assert original == again
    ema = evaluate_checkpoint(c, resumed, step=6, use_ema=True)
    assert ema["weights"] == "ema" and ema["loss"] != again["loss"]


def test_mismatched_checkpoint_is_named(full_run, tmp_path):
    c, workdir, _ = full_run
    other = micro_run_config(tmp_path)
    other.model.kv_lora_rank = 8
    with pytest.raises(checkpoint.CheckpointError, match="kv_lora_rank: checkpoint 16 vs config 8"):
        evaluate_checkpoint(other, workdir)


def test_a_refused_resume_leaves_the_runs_config_as_it_was(full_run, tmp_path):
    c, workdir, _ = full_run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    saved = open(os.path.join(copy, "config.json")).read()
    other = micro_run_config(tmp_path)
    other.model.kv_lora_rank = 8
    with pytest.raises(checkpoint.CheckpointError, match="kv_lora_rank: checkpoint 16 vs config 8"):
        train_and_evaluate(other, copy)
    assert open(os.path.join(copy, "config.json")).read() == saved


def test_a_resume_that_changes_the_run_is_refused_unless_the_config_allows_the_change(full_run, tmp_path):
    c, workdir, _ = full_run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    changed = ml_collections.ConfigDict(c.to_dict())
    changed.data.batch_size, changed.train.learning_rate = 2, c.train.learning_rate / 2
    changed.train.steps = 6  # may always change; here the run is done: the resume only evaluates
    with pytest.raises(checkpoint.CheckpointError) as refused:
        train_and_evaluate(changed, copy)
    assert (f"data.batch_size: checkpoint 4 vs config 2, train.learning_rate: checkpoint {c.train.learning_rate!r} "
            f"vs config {c.train.learning_rate / 2!r}") in str(refused.value)
    assert str(refused.value).endswith("--config.checkpoint.allow_changes=data.batch_size,train.learning_rate.")

    changed.checkpoint.allow_changes = "data.batch"
    with pytest.raises(ValueError, match="checkpoint.allow_changes names 'data.batch', which is not checked"):
        train_and_evaluate(changed, copy)
    changed.checkpoint.allow_changes = "data.batch_size, train.learning_rate"
    assert train_and_evaluate(changed, copy)["start_step"] == 6


def test_truncated_checkpoint_is_a_clear_error(full_run, tmp_path):
    c, workdir, _ = full_run
    damaged = str(tmp_path / "damaged")
    shutil.copytree(workdir, damaged)
    state_dir = os.path.join(damaged, "checkpoints", "6", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64:
                with open(path, "r+b") as f:
                    f.truncate(16)
    with pytest.raises(checkpoint.CheckpointError, match="damaged or incomplete"):
        evaluate_checkpoint(c, damaged, step=6)


def test_interrupted_save_leaves_latest_good_checkpoint(full_run, tmp_path):
    c, workdir, _ = full_run
    copy = str(tmp_path / "interrupted")
    shutil.copytree(workdir, copy)
    # What a save killed mid-write leaves: orbax's temporary directory, never renamed into place.
    partial = os.path.join(copy, "checkpoints", "9.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "garbage"), "wb") as f:
        f.write(b"\0" * 10)
    ckpt = checkpoint.Checkpointer(os.path.join(copy, "checkpoints"), keep=5, async_save=False)
    assert ckpt.latest_step() == 6
    ckpt.close()
    assert evaluate_checkpoint(c, copy)["step"] == 6


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    """Also: --cpu_devices splits the CPU (the run itself stays on one device)."""
    c = micro_run_config(tmp_path, steps=100000, eval_every=100000, ema_decay=0.0)
    c.checkpoint.every = 100000
    workdir = tmp_path / "run"
    flags = [f"--config={ROOT / 'configs' / 'tiny.py'}", f"--workdir={workdir}", "--cpu_devices=2"]
    flags += [f"--config.{group}.{k}={v}" for group in ("model", "data", "train", "checkpoint")
              for k, v in c[group].items() if v is not None and not isinstance(v, dict)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "deepseek_jax.train", *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (workdir / "metrics.csv").exists():
        time.sleep(0.5)
    time.sleep(3)  # A few training steps.
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "SIGTERM: saved step" in output
    assert "JAX devices: [CpuDevice(id=0), CpuDevice(id=1)] (1 process(es))" in output
    steps = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    assert len(steps) == 1 and steps[0] > 0


def test_fine_tune_starts_from_a_converted_checkpoint(tmp_path):
    from deepseek_jax import convert, model
    from deepseek_jax.train.evaluation import evaluate

    c = micro_run_config(tmp_path, steps=1, warmup_steps=0, ema_decay=0.0)
    cfg = ModelConfig.from_dict(c.model)
    variables = model.init(cfg, jax.random.key(7))  # Not the run's seed: a different model.
    convert.save_checkpoint(cfg, variables, str(tmp_path / "hf"))
    convert.hf_to_workdir(str(tmp_path / "hf"), str(tmp_path / "converted"))
    c.train.init_from = str(tmp_path / "converted")
    summary = train_and_evaluate(c, str(tmp_path / "run"))
    expected = evaluate(cfg, variables, c.data, c.train.eval_batches)
    assert summary["initial_eval_bpb"] == pytest.approx(expected["bpb"], rel=1e-6)


def test_fine_tune_starts_from_a_training_run(full_run, tmp_path):
    """`train.init_from` also takes a training run's workdir: its latest params, a fresh optimizer."""
    c, workdir, _ = full_run
    c = micro_run_config(tmp_path, write_corpus=False, steps=1, warmup_steps=0, ema_decay=0.0)
    c.data.path = full_run[0].data.path
    c.train.init_from = workdir
    summary = train_and_evaluate(c, str(tmp_path / "fine_tuned"))
    assert summary["initial_eval_bpb"] == pytest.approx(evaluate_checkpoint(full_run[0], workdir)["bpb"], rel=1e-6)


def test_export_of_a_training_run_runs_in_transformers(full_run, tmp_path):
    """`convert --direction=export --workdir=<training run>`: transformers loads the folder and gives our
    logits for the run's latest params; `--use_ema --dtype=float8_e4m3fn` writes the EMA in DeepSeek's FP8
    blocks (the unquantized embedding is the EMA's, to the last bf16 bit)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import safetensors.torch

    from deepseek_jax import convert, model
    from deepseek_jax.train.export import export_training_run
    from deepseek_jax.train.weights import load_weights

    c, workdir, _ = full_run
    cfg = ModelConfig.from_dict(c.model)
    assert export_training_run(workdir, str(tmp_path / "hf")) == f"{workdir} step 6"
    variables = load_weights(workdir, cfg, optimizer_cfg=c.train).variables
    tokens = np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32)
    ours = np.asarray(jax.jit(model.forward, static_argnums=0)(cfg, variables, jnp.asarray(tokens)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager",
                                                           experts_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["eos_token_id"], hf_config["pad_token_id"]) == (256, 257)

    out = tmp_path / "fp8"
    done = subprocess.run([sys.executable, "-m", "deepseek_jax.convert", "--direction=export", f"--workdir={workdir}",
                           f"--hf_path={out}", "--use_ema", "--dtype=float8_e4m3fn"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    tensors = {}
    for file in out.glob("*.safetensors"):
        tensors.update(safetensors.torch.load_file(str(file)))
    assert tensors["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.1.mlp.experts.0.up_proj.weight_scale_inv" in tensors
    ema = load_weights(workdir, cfg, optimizer_cfg=c.train, use_ema=True).variables
    _, back = convert.load_checkpoint(str(out))
    embedding = lambda v: np.asarray(v["params"]["embed_tokens"]["embedding"].astype(jnp.bfloat16))  # noqa: E731
    np.testing.assert_array_equal(embedding(back), embedding(ema))
    assert not np.array_equal(embedding(back), embedding(variables))


def test_training_on_deepseeks_tokenizer(tmp_path):
    """Two steps with data.tokenizer='deepseek' and the vocabulary DeepSeek's configs use; a model whose
    vocabulary is smaller than the tokenizer's is refused (its ids would be clamped without a word)."""
    c = micro_run_config(tmp_path, steps=2, eval_every=2, ema_decay=0.0)
    c.data.tokenizer = "deepseek"
    with pytest.raises(ValueError, match=r"vocab_size=264 is smaller than data.tokenizer's 129280 ids.*e.g. 129280"):
        train_and_evaluate(c, str(tmp_path / "refused"))
    c.model.vocab_size = 129_280
    summary = train_and_evaluate(c, str(tmp_path / "run"))
    assert summary["steps"] == 2 and summary["final_eval_bpb"] < summary["initial_eval_bpb"]
    small = config("small", "tokenizer=deepseek")
    assert (small.data.tokenizer, small.model.vocab_size) == ("deepseek", 129_280)


def test_pipelined_data_parallel_run_matches_the_unpipelined_one(tmp_path):
    """`--config.parallel.stage=2 --config.parallel.data=2 --config.parallel.expert=2
    --config.parallel.pipeline=dualpipe` (each stage's experts split over 'expert', reached by all-to-all
    inside the pipeline) trains the same model as one device: losses and validation. (Every schedule and
    layout is compared step by step in test_execute.py.)"""
    losses, summaries = {}, {}
    for stage, data, expert in ((1, 1, 1), (2, 2, 2)):
        name = f"{stage}{data}{expert}"
        c = micro_run_config(tmp_path / name, steps=2, eval_every=100, ema_decay=0.0)
        c.model.num_hidden_layers = 3  # Two MoE layers: one per pipeline stage.
        c.data.batch_size = 16  # 4 micro-batches of 4 rows, split over the data (x expert) shards.
        c.parallel.update(stage=stage, data=data, expert=expert, pipeline="dualpipe", microbatches=4)
        summaries[name] = train_and_evaluate(c, str(tmp_path / name / "run"))
        losses[name] = {s: float(v) for s, v in losses_by_step(str(tmp_path / name / "run")).items()}
    assert losses["111"].keys() == losses["222"].keys() == {1, 2}
    for s in losses["111"]:
        assert losses["222"][s] == pytest.approx(losses["111"][s], rel=1e-5)
    assert summaries["222"]["final_eval_bpb"] == pytest.approx(summaries["111"]["final_eval_bpb"], rel=1e-5)


def test_bad_pipeline_config_is_named(tmp_path):
    c = micro_run_config(tmp_path)
    c.parallel.update(stage=2, pipeline="dualpipe", microbatches=3)
    with pytest.raises(ValueError, match="parallel.microbatches"):
        train_and_evaluate(c, str(tmp_path / "run"))
