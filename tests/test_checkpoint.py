"""Checkpoint digests: computed from the arrays, the same on any mesh, and verified on restore; damaged
metadata and iterator state named on restore."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from common import model_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.train import digest
from deepseek_jax.train.checkpoint import Checkpointer, CheckpointError


def arrays(seed: int = 0) -> dict:
    k = jax.random.split(jax.random.key(seed), 5)
    return {"w": jax.random.normal(k[0], (64, 48)), "half": jax.random.normal(k[1], (16, 8)).astype(jnp.bfloat16),
            "counts": jax.random.randint(k[2], (40,), 0, 1000), "flags": jax.random.bernoulli(k[3], 0.5, (24,)),
            "bytes": jax.random.randint(k[4], (8, 8), 0, 255).astype(jnp.uint8), "step": jnp.int32(7)}


def test_digests_are_the_same_on_any_mesh():
    tree = arrays()
    one = digest.tree_digests(tree)
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    for spec in (P("a", "b"), P("b", None), P(None, ("a", "b"))):
        sharded = {k: jax.device_put(v, NamedSharding(mesh, spec if v.ndim == 2 else P(spec[0]) if v.ndim else P()))
                   for k, v in tree.items()}
        assert digest.tree_digests(sharded) == one
    host = jax.tree.map(np.asarray, tree)
    assert digest.tree_digests(host) == one


@pytest.mark.parametrize("name", ["w", "half", "counts", "flags", "bytes"])
def test_any_changed_element_or_swap_changes_the_digest(name):
    """The lowest bit of one element flipped (six random positions), or two different elements swapped."""
    tree = arrays()
    shape = tree[name].shape
    key = f"['{name}']"
    before = digest.tree_digests(tree)[key]
    flat = np.asarray(tree[name]).reshape(-1)

    def digest_of(values):
        return digest.tree_digests({name: jnp.asarray(values.reshape(shape))})[key]

    for i in np.random.default_rng(1).choice(flat.size, 6, replace=False):
        changed = flat.copy()
        if changed.dtype == bool:
            changed[i] = not changed[i]
        else:
            changed.view(f"uint{8 * changed.dtype.itemsize}")[i] ^= 1
        assert digest_of(changed) != before
    other = int(np.flatnonzero(flat != flat[0])[0])
    swapped = flat.copy()
    swapped[[0, other]] = swapped[[other, 0]]
    assert digest_of(swapped) != before


def corrupt(directory: str, step: int) -> None:
    """Overwrites 256 bytes in the middle of the step's largest array file, as a disk or a careless
    hand would: orbax reads such a file back without complaint."""
    files = glob.glob(os.path.join(directory, str(step), "state", "ocdbt.process_0", "d", "*"))
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        f.write(b"\xff" * 256)


def test_restore_refuses_changed_bytes_and_names_the_array_and_the_intact_step(tmp_path):
    cfg = model_config()
    ckpt = Checkpointer(str(tmp_path), keep=5, async_save=False)
    states = {step: {"params": {"w": jax.random.normal(jax.random.key(step), (256, 256))}, "step": jnp.int32(step)}
              for step in (1, 2, 3)}
    for step, state in states.items():
        ckpt.save(step, state, ema={"w": np.full((4,), float(step), np.float32)}, data_state={"position": step},
                  model_config=cfg)
    ckpt.wait()
    like = jax.tree.map(jnp.zeros_like, states[1])
    corrupt(str(tmp_path), 3)
    named = r"3 does not match the digests.*state\['params'\]\['w'\] changed.*Step 2 is intact"
    with pytest.raises(CheckpointError, match=named):
        ckpt.restore(3, like, ema_like={"w": np.zeros(4, np.float32)}, model_config=cfg)
    corrupt(str(tmp_path), 2)
    with pytest.raises(CheckpointError, match="Step 1 is intact"):
        ckpt.restore(3, like, ema_like=None, model_config=cfg)
    restored = ckpt.restore(1, like, ema_like={"w": np.zeros(4, np.float32)}, model_config=cfg)
    np.testing.assert_array_equal(restored["state"]["params"]["w"], states[1]["params"]["w"])
    assert restored["data"] == {"position": 1} and float(restored["ema"]["w"][0]) == 1.0
    corrupt(str(tmp_path), 1)
    with pytest.raises(CheckpointError, match="No earlier step verifies"):
        ckpt.restore(3, like, ema_like=None, model_config=cfg)
    ckpt.close()


def test_checkpoints_saved_without_digests_still_restore(tmp_path):
    """Saved before digests were recorded: restored, unverified (a warning says so)."""
    cfg = model_config()
    ckpt = Checkpointer(str(tmp_path), keep=1, async_save=False)
    state = {"w": jnp.arange(6.0)}
    ckpt._manager.save(1, args=ocp.args.Composite(  # the layout of a checkpoint from before the digests
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"position": 0}),
        meta=ocp.args.JsonSave({"model": cfg.to_dict(), "step": 1})))
    ckpt.wait()
    restored = ckpt.restore(1, state, ema_like=None, model_config=cfg)
    np.testing.assert_array_equal(restored["state"]["w"], state["w"])
    ckpt.close()


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A checkpoint directory with steps 1 and 2 of a small state, EMA and data iterator state."""
    directory = tmp_path_factory.mktemp("two_steps")
    ckpt = Checkpointer(str(directory), keep=5, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.arange(6.0) * step}, ema={"w": jnp.ones(6)}, data_state={"position": step},
                  model_config=model_config())
    ckpt.close()
    return directory


# (file of step 2, how it is damaged, what the error says)
DAMAGE = {
    "iterator state edited": ("data/metadata", lambda b: b.replace(b"2", b"7"),
                              "the data iterator's state changed on disk after the save. Step 1 is intact"),
    "iterator state cut": ("data/metadata", lambda b: b[:5], "{step}/data/metadata is not valid JSON"),
    "run record cut": ("meta/metadata", lambda b: b[:50], "{step}/meta/metadata is not valid JSON"),
    "run record emptied": ("meta/metadata", lambda b: b"", "{step}/meta/metadata is not valid JSON"),
    "array metadata cut": ("state/_METADATA", lambda b: b[:40], "{step}/state/_METADATA is not valid JSON"),
    "per-process array metadata cut": ("state/array_metadatas/process_0", lambda b: b[:20],
                                       "{step}/state/array_metadatas/process_0 is not valid JSON"),
    "OCDBT manifest overwritten": ("state/manifest.ocdbt", lambda b: b"\xff" * len(b),
                                   "Error decoding local file \"{step}/state/manifest.ocdbt\""),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_metadata_or_iterator_state_is_named_and_the_earlier_step_still_restores(two_steps, tmp_path, case):
    relative, damage, message = DAMAGE[case]
    directory = tmp_path / "checkpoints"
    shutil.copytree(two_steps, directory)
    path = directory / "2" / relative
    path.write_bytes(damage(path.read_bytes()))
    ckpt = Checkpointer(str(directory), keep=5, async_save=False)
    like, ema_like = {"w": jnp.zeros(6)}, {"w": jnp.zeros(6)}
    with pytest.raises(CheckpointError) as refused:
        ckpt.restore(2, like, ema_like=ema_like, model_config=model_config())
    assert message.format(step=directory / "2") in str(refused.value)
    assert str(refused.value).startswith(f"checkpoint {directory / '2'} ")
    earlier = ckpt.restore(1, like, ema_like=ema_like, model_config=model_config())
    np.testing.assert_array_equal(earlier["state"]["w"], np.arange(6.0))
    assert earlier["data"] == {"position": 1}
    ckpt.close()
