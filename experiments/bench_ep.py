"""Expert parallelism: bytes the all-to-all dispatch moves per MoE layer, and the training step on EP meshes.

    python experiments/bench_ep.py        (6 minutes on 2 idle cores, 10 when another process shares them)

Bytes (per device, per MoE layer, forward; the backward pass moves the same rows again as cotangents):

  padded buffer   what `ep_dispatch` moves on XLA:CPU (ep_traffic.py's `dispatch_bytes`): (ep-1) blocks of C
                  rows x D for the dispatch and again for the combine, plus the int32 expert ids. Dropless
                  C = n*min(K, E_l); with capacity_factor 1.25, C = ceil(1.25*n*K/ep). Cross-checked against the
                  all-to-alls of the lowered program (forward, and forward + backward).
  payload         the rows that carry a (token, expert) pair off the device (`payload_rows` on real routing),
                  both ways, + 4 bytes of id per row: what a ragged_all_to_all (GPU/TPU) would move with the
                  same one-row-per-pair packing. Not implemented or measured here: a count.
  payload, dedup  one row per (token, destination device), as DeepEP sends (the destination sums a token's
                  local experts before the combine): a lower bound for a smarter packing.
  all-gather      the baseline in which each device gathers the other devices' n tokens, runs its experts on
                  all of them and reduce-scatters the outputs: 2 (ep-1) n D bytes.

Shapes: configs/tiny.py's MoE layer (D 256, E 8, K 2, float32 as it runs on CPU) with n = 256 tokens per device
(its 8 x 256 batch over 8 devices), routed by the tiny model's gate (at init, on unit-RMS random inputs as the
post-norm hidden state has) and by uniform random top-K; DeepSeek-V3's (D 7168, E 256, K 8, bf16 payload) with
n = 4096 tokens per device (one 4K sequence per micro-batch, as in DeepSeek's EP64 training profile,
github.com/deepseek-ai/profile-data), uniform random top-K; EP 64 analytically only.

Step time: the jitted training step (train/step.py, shardings from train/placement.py, as train/pretrain.py jits it)
of the tiny model (3 MoE layers + MTP, 8 experts) on a batch of 8 x 128 tokens, on meshes (data=8/ep,
expert=ep) of the 8 simulated CPU devices and on a mesh of one device. The 8 devices share this machine's
cores, so the times measure overheads (all-to-all copies, padded expert GEMMs), not a speed-up.

Writes experiments/results/bench_ep.{json,md,png}.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from ep_traffic import dispatch_bytes, payload_rows, pipelined_step_bytes  # noqa: E402

from deepseek_jax import defaults, model  # noqa: E402
from deepseek_jax.model import moe  # noqa: E402
from deepseek_jax.model.config import ModelConfig  # noqa: E402
from deepseek_jax.parallel import expert_parallel as ep_lib  # noqa: E402
from deepseek_jax.parallel import mesh as mesh_lib  # noqa: E402
from deepseek_jax.parallel.dispatch import training_model_config  # noqa: E402
from deepseek_jax.train import pipelined, placement  # noqa: E402
from deepseek_jax.train import step as step_lib  # noqa: E402
from deepseek_jax.train.memory import plan_memory  # noqa: E402
from deepseek_jax.train.optimizer import make_optimizer  # noqa: E402
from deepseek_jax.train.validation import validate_run_config  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
_OUT_DIR = flags.DEFINE_string("out_dir", str(ROOT / "experiments" / "results"), "Where to write the results.")
_STEPS = flags.DEFINE_integer("steps", 7, "Timed rounds (one step per mesh each) after the warm-up; medians kept.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows of the timed training batch.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per row of the timed training batch.")
_CAPACITY_EPS = flags.DEFINE_list("capacity_eps", ["8"], "EP sizes also timed with capacity_factor 1.25.")

DEVICES = 8
CAPACITY_FACTOR = 1.25
LAYERS = {  # The MoE layer shapes: D model, E experts, K per token, bytes per payload element, n tokens/device.
    "tiny": dict(D=256, E=8, K=2, itemsize=4, n=256, eps=(2, 4, 8), dtype=jnp.float32, F=128),
    "deepseek_v3": dict(D=7168, E=256, K=8, itemsize=2, n=4096, eps=(2, 4, 8, 64), dtype=jnp.bfloat16, F=2048),
}
STEP_NOTES = (
    "Reading the step times: XLA:CPU lowers `lax.ragged_dot` as a masked dense dot over all of its groups, so the "
    "expert GEMMs cost (rows x local experts), not rows: EP shrinks the local experts and wins on this machine for "
    "that reason alone. With `ragged` on a data-parallel mesh (EP=1, data=8), the global argsort of the (token, "
    "expert) pairs makes the partitioner gather them: the compiled program sorts all N*K pairs of the global batch "
    "on every device and runs the experts on all of them, 8x redundant work on shared cores. `ep` rows are the "
    "padded receive buffer ep*C (dropless C = n*min(K, E/ep)), of which n*K carry tokens. Most all-gathers with "
    "data > 1 are ZeRO-1's parameter gathers after the sharded update.")
ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4, "ui32": 4, "i64": 8, "f64": 8, "i8": 1, "i1": 1}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "cpu") if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu}", "jax": jax.__version__,
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} (simulated: "
                       "--xla_force_host_platform_device_count=8)",
            "note": (f"The {jax.device_count()} simulated devices share the machine's {os.cpu_count()} CPU cores, so "
                     "step times measure overheads (all-to-all copies, padding), not speed-up. Another process "
                     "used the CPU at times during the run: see load_average_per_round (ours alone is at most 2).")}


# ----------------------------------------------------------------------------------------------- routing


def tiny_gate_indices(n_tokens: int, seed: int = 0) -> np.ndarray:
    """[N, K] experts chosen by the tiny model's first MoE gate (at init, zero balancing bias) for unit-RMS
    random inputs, like the RMS-normed hidden state the gate sees."""
    cfg = ModelConfig.from_dict(defaults.load_config(str(ROOT / "configs" / "tiny.py")).model)
    variables = model.init(cfg, jax.random.key(seed))
    gate = {"params": jax.tree.map(lambda a: a[0], variables["params"]["moe_layers"]["mlp"]["gate"]),
            "routing": jax.tree.map(lambda a: a[0], variables["routing"]["moe_layers"]["mlp"]["gate"])}
    x_ND = jax.random.normal(jax.random.key(seed + 1), (n_tokens, cfg.hidden_size), jnp.float32)
    _, indices, _ = moe.Gate(cfg).apply(gate, x_ND)
    return np.asarray(indices)


def uniform_indices(n_tokens: int, E: int, K: int, seed: int = 0) -> np.ndarray:
    """[N, K] distinct experts per token, uniformly at random."""
    return np.argpartition(np.random.default_rng(seed).random((n_tokens, E)), K, axis=1)[:, :K]


# ------------------------------------------------------------------------------------------------- bytes


def dedup_rows(indices_NK: np.ndarray, E: int, ep: int, shards: int) -> np.ndarray:
    """Off-device (token, destination device) pairs per source shard [S]: one row per token and device."""
    N = indices_NK.shape[0]
    hit = np.zeros((N, ep), bool)
    hit[np.arange(N)[:, None], indices_NK // (E // ep)] = True
    hit = hit.reshape(shards, N // shards, ep)
    hit[np.arange(shards), :, np.arange(shards) % ep] = False  # The block for itself stays local.
    return hit.sum(axis=(1, 2))


def measured_payload(indices_NK: np.ndarray, E: int, ep: int, n: int, row_bytes: int) -> dict:
    """Payload bytes per source device (mean and max over the 8 batch shards) for the routing `indices_NK`,
    dropless and with capacity_factor 1.25 (a destination's rows past C are dropped)."""
    K = indices_NK.shape[1]
    shards = indices_NK.shape[0] // n
    rows_Sp = payload_rows(indices_NK, E, ep, shards)
    off = np.ones_like(rows_Sp, bool)
    off[np.arange(shards), np.arange(shards) % ep] = False
    C = ep_lib.capacity(n, K, E // ep, ep, CAPACITY_FACTOR)
    dropless = (rows_Sp * off).sum(axis=1) * row_bytes
    capped = (np.minimum(rows_Sp, C) * off).sum(axis=1) * row_bytes
    dedup = dedup_rows(indices_NK, E, ep, shards) * row_bytes
    loads = rows_Sp.sum(axis=0)  # Pairs each expert device receives, over all sources.
    return {"payload": float(dropless.mean()), "payload_max": int(dropless.max()),
            "payload_cf": float(capped.mean()), "dropped_fraction_cf": float(np.maximum(rows_Sp - C, 0).sum()
                                                                            / indices_NK.size),
            "payload_dedup": float(dedup.mean()), "device_load_max_over_mean": float(loads.max() / loads.mean())}


def analytic_payload(n: int, E: int, K: int, ep: int, row_bytes: int) -> dict:
    """Expected payload under uniform random top-K: n*K*(ep-1)/ep pairs; and (ep-1)*n*P(a device receives
    at least one of a token's K experts) deduplicated rows."""
    E_l = E // ep
    p_hit = 1 - math.comb(E - E_l, K) / math.comb(E, K)
    return {"payload": n * K * (ep - 1) / ep * row_bytes, "payload_dedup": (ep - 1) * n * p_hit * row_bytes}


def hlo_all_to_all_bytes(layer: dict, ep: int, capacity_factor: float) -> dict:
    """Off-device bytes of the all-to-alls in the lowered `ep_dispatch` program on a (data=8/ep, expert=ep)
    mesh: forward only, and forward + backward (gradients of x and the expert weights). Lowered, not
    compiled: the V3 buffers would not fit this machine."""
    D, E, K, F, n, dt = layer["D"], layer["E"], layer["K"], layer["F"], layer["n"], layer["dtype"]
    N = DEVICES * n
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(stage=1, data=DEVICES // ep, expert=ep, tensor=1)))
    S = jax.ShapeDtypeStruct
    args = (S((N, D), dt), S((N, K), jnp.float32), S((N, K), jnp.int32),
            (S((E, D, F), dt), S((E, D, F), dt), S((E, F, D), dt)))

    def forward(x, w, idx, ws):
        return ep_lib.ep_dispatch(x, w, idx, ws, capacity_factor=capacity_factor)[0]

    def loss(x, w, idx, ws):  # Non-linear in y, so the forward combine is live in the gradient program.
        return jnp.sum(jnp.square(forward(x, w, idx, ws).astype(jnp.float32)))

    out = {}
    with jax.set_mesh(mesh):
        for name, fn in (("forward", forward), ("forward_backward", jax.grad(loss, argnums=(0, 3)))):
            out[name] = _count_all_to_all(jax.jit(fn).lower(*args).as_text())
    return out


def _count_all_to_all(stablehlo: str) -> int:
    total = 0
    for line in stablehlo.splitlines():
        if '"stablehlo.all_to_all"' not in line:
            continue
        split = int(re.search(r"split_count = (\d+)", line).group(1))
        operands = line.rsplit(" : (", 1)[1].split(") ->")[0]
        for dims, dtype in re.findall(r"tensor<((?:\d+x)*)(\w+)>", operands):
            elements = math.prod(int(d) for d in dims.split("x") if d)
            total += elements * ITEMSIZE[dtype] * (split - 1) // split
    return total


def bytes_table(name: str, layer: dict) -> list[dict]:
    D, E, K, n, itemsize = layer["D"], layer["E"], layer["K"], layer["n"], layer["itemsize"]
    row_bytes = 2 * D * itemsize + 4  # Dispatch row + combine row + the int32 expert id.
    routings = {"uniform": uniform_indices(DEVICES * n, E, K)}
    if name == "tiny":
        routings = {"tiny_gate": tiny_gate_indices(DEVICES * n), **routings}
    rows = []
    for ep in layer["eps"]:
        E_l = E // ep
        C0, C1 = ep_lib.capacity(n, K, E_l, ep, 0.0), ep_lib.capacity(n, K, E_l, ep, CAPACITY_FACTOR)
        padded, padded_cf = (dispatch_bytes(n, K, D, ep, C, itemsize) for C in (C0, C1))
        row = {"layer": name, "ep": ep, "tokens_per_device": n, "capacity_dropless": C0, "capacity_cf": C1,
               "padded_dropless": padded["ep_total"], "padded_cf": padded_cf["ep_total"],
               "allgather": padded["allgather_total"], "dispatch_bytes_dropless": padded,
               "analytic_uniform": analytic_payload(n, E, K, ep, row_bytes)}
        if ep <= DEVICES:
            row["measured"] = {r: measured_payload(idx, E, ep, n, row_bytes) for r, idx in routings.items()}
            row["hlo_dropless"] = hlo_all_to_all_bytes(layer, ep, 0.0)
            row["hlo_cf"] = hlo_all_to_all_bytes(layer, ep, CAPACITY_FACTOR)
        rows.append(row)
        print(f"{name} ep={ep}: padded {row['padded_dropless'] / 2**20:.2f} MiB, cf {row['padded_cf'] / 2**20:.2f}, "
              f"all-gather {row['allgather'] / 2**20:.2f}, payload {_payload(row) / 2**20:.2f}", flush=True)
    return rows


def _payload(row: dict, key: str = "payload") -> float:
    """Measured (first routing) where there is one, else the uniform-routing expectation."""
    if "measured" in row:
        return next(iter(row["measured"].values()))[key]
    return row["analytic_uniform"][key]


# ------------------------------------------------------------------------------------------- pipelined step


def _pipelined_layouts() -> dict:
    """configs/v3_layout.py as it trains here, and DeepSeek-V3 on its 2048-device layout (4096-token rows,
    one per device per micro-batch), dropless and with capacity factor 1."""
    layouts = {"tiny (v3_layout: 2 x 2 x 2, DualPipe, 4 micro-batches)": defaults.load_config(
        str(ROOT / "configs" / "v3_layout.py"))}
    for cf in (0.0, 1.0):
        v3 = defaults.load_config(str(ROOT / "configs" / "deepseek_v3.py"))
        v3.data.update(seq_len=4096, batch_size=15360)
        v3.parallel.update(stage=16, expert=64, data=2, pipeline="dualpipe", microbatches=120, capacity_factor=cf)
        layouts[f"DeepSeek-V3 (16 x 64 x 2, DualPipe, 120 micro-batches), {'dropless' if cf == 0 else 'cf 1'}"] = v3
    return layouts


def pipelined_bytes() -> list[dict]:
    """Bytes one device sends per pipelined training step, by ppermute and by all-to-all (ep_traffic.py's
    `pipelined_step_bytes`, from the executor's op table; the slots' size from the memory plan's trace)."""
    rows = []
    for name, config in _pipelined_layouts().items():
        cfg, p = ModelConfig.from_dict(config.model), config.parallel
        plan = pipelined.make_plan(p.pipeline, p.stage, p.microbatches, p.expert)
        buffers = plan_memory(config, stash_variants=()).rank_buffers
        tokens = config.data.batch_size // p.microbatches // (p.data * p.expert) * config.data.seq_len
        itemsize = jnp.dtype(cfg.dtype).itemsize
        C = ep_lib.capacity(tokens, cfg.num_experts_per_tok, cfg.n_routed_experts // p.expert, p.expert,
                            p.capacity_factor)
        layer = dispatch_bytes(tokens, cfg.num_experts_per_tok, cfg.hidden_size, p.expert, C, itemsize)
        sent = pipelined_step_bytes(
            plan, act_bytes=tokens * cfg.hidden_size * itemsize, layer_forward=layer["ep_total"],
            layer_backward=layer["ep_total"] - layer["ep_ids"],
            layers_per_stage=-(-cfg.num_moe_layers // plan.schedule.num_stages),
            head_layers=cfg.num_nextn_predict_layers, slot_bytes=buffers.slot_params // plan.num_slots)
        rows.append({"layout": name, "ticks": plan.num_ticks, "tokens_per_device_per_microbatch": tokens,
                     "capacity": C, **sent})
        print(f"{name}: ppermute {sent['ppermute'] / 2**20:,.1f} MiB, all-to-all {sent['all_to_all'] / 2**20:,.1f} MiB "
              "per device per step", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ step time


def synthetic_batch(rows: int, length: int) -> dict:
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (rows, length), 0, 256, jnp.int32))
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()}


def prepare_step(ep: int, devices: list, capacity_factor: float = 0.0) -> tuple[dict, object]:
    """Compiles and warms up the tiny model's training step on a (data=len(devices)/ep, expert=ep) mesh.
    Returns (its description, a function that runs one more step and returns its seconds)."""
    config = defaults.load_config(str(ROOT / "configs" / "tiny.py"))
    config.data.update(batch_size=_BATCH.value, seq_len=_SEQ.value)
    config.parallel.update(data=len(devices) // ep, expert=ep, capacity_factor=capacity_factor)
    cfg = training_model_config(config, validate_run_config(config))
    tx = make_optimizer(config.train)
    mesh = mesh_lib.make_mesh(config.parallel, devices)
    shardings = placement.state_shardings(cfg, tx, mesh)
    state = placement.init_sharded_state(cfg, tx, jax.random.key(0), mesh)
    batch = mesh_lib.shard_batch(synthetic_batch(_BATCH.value, _SEQ.value), mesh)
    step = functools.partial(step_lib.train_step, cfg=cfg, train_cfg=config.train, tx=tx)
    replicated = NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh):
        jitted = jax.jit(step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                         out_shardings=(shardings, replicated), donate_argnums=(0,))
        start = time.perf_counter()
        compiled = jitted.lower(state, batch).compile()
        compile_seconds = time.perf_counter() - start
    state, metrics = compiled(state, batch)  # Warm-up.
    first = jax.device_get(metrics)
    holder = {"state": state}

    def run_once() -> float:
        start = time.perf_counter()
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    n = _BATCH.value * _SEQ.value // len(devices)
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    if cfg.moe_dispatch == "ep":  # The padded receive buffer through the E/ep local experts.
        rows, local = ep * ep_lib.capacity(n, K, E // ep, ep, capacity_factor), E // ep
    else:  # `ragged` sorts the global pairs: the partitioner replicates them on every device (see notes).
        rows, local = _BATCH.value * _SEQ.value * K, E
    pairs = _BATCH.value * _SEQ.value * K * (cfg.num_moe_layers + cfg.num_nextn_predict_layers)
    info = {"devices": len(devices), "data": len(devices) // ep, "expert": ep, "capacity_factor": capacity_factor,
            "moe_dispatch": cfg.moe_dispatch, "batch": _BATCH.value, "seq_len": _SEQ.value, "tokens_per_device": n,
            "compile_seconds": compile_seconds, "temp_bytes_per_device": compiled.memory_analysis().temp_size_in_bytes,
            "first_step_loss": float(first["loss"]),
            "dropped_fraction_first_step": float(first.get("dropped_pairs", 0)) / pairs,
            "expert_rows_per_device": rows, "local_experts": local, "collectives": _collectives(compiled.as_text())}
    return info, run_once


def _collectives(hlo: str) -> dict[str, int]:
    """Collective instructions in the compiled program, by kind (static count: a scanned layer counts once)."""
    kinds = re.findall(r"^\s*(?:ROOT )?%\S+ = .*? (all-gather|all-reduce|all-to-all|reduce-scatter|"
                       r"collective-permute)(?:-start)?\(", hlo, re.MULTILINE)
    return {k: kinds.count(k) for k in sorted(set(kinds))}


def step_times() -> tuple[list[dict], list[float]]:
    """Every mesh compiled first, then timed in interleaved rounds (one step of each per round), so that load
    from other processes falls on all of them alike. Returns (runs, 1-minute load average after each round)."""
    devices = jax.devices()
    plan = [("1 device", [devices[0]], 1, 0.0)]
    plan += [(f"EP={ep}", devices, ep, 0.0) for ep in (1, 2, 4, 8)]
    plan += [(f"EP={ep}, cf {CAPACITY_FACTOR}", devices, int(ep), CAPACITY_FACTOR) for ep in _CAPACITY_EPS.value]
    runs, steppers = [], []
    for label, devs, ep, cf in plan:
        info, run_once = prepare_step(ep, devs, cf)
        runs.append({"label": label, **info, "step_seconds": []})
        steppers.append(run_once)
        print(f"{label}: compiled in {info['compile_seconds']:.0f} s, first-step loss {info['first_step_loss']:.6f}",
              flush=True)
    loads = []
    for _ in range(_STEPS.value):
        for run, run_once in zip(runs, steppers):
            run["step_seconds"].append(run_once())
        loads.append(os.getloadavg()[0])
    for run in runs:
        run["seconds_per_step"] = float(np.median(run["step_seconds"]))
        print(f"{run['label']}: {1e3 * run['seconds_per_step']:.0f} ms/step "
              f"({', '.join(f'{1e3 * t:.0f}' for t in run['step_seconds'])})", flush=True)
    return runs, loads


# ------------------------------------------------------------------------------------------------- outputs


def _mib(b: float) -> str:
    return f"{b / 2**20:,.2f}" if b < 2**30 else f"{b / 2**20:,.0f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Expert parallelism: dispatch bytes and step time", "",
             f"Machine: {m['machine']}; jax {m['jax']}; {m['devices']}.", "",
             "## Bytes one device sends per MoE layer (forward), MiB", "",
             "**Padded** = the buffers our `all_to_all` moves on XLA:CPU (C rows per destination, dispatch + combine "
             "+ int32 ids). **Payload** = the rows that carry a (token, expert) pair, what a `ragged_all_to_all` on "
             "GPU/TPU would move (not implemented; a count). **Dedup** = one row per (token, destination device), as "
             "DeepEP sends. **All-gather** = gather all tokens + reduce-scatter the outputs. The backward pass moves "
             "the same rows again.", ""]
    for name, layer in LAYERS.items():
        rows = result["bytes"][name]
        routing = "tiny model's gate (init) on random inputs" if name == "tiny" else "uniform random top-K"
        lines += [f"### {name}: D={layer['D']}, E={layer['E']}, K={layer['K']}, {layer['itemsize']}-byte payload, "
                  f"n={layer['n']} tokens/device; payload from {routing}"
                  + ("; EP 64 analytic (uniform routing)" if 64 in layer["eps"] else ""), "",
                  "| EP | C dropless | padded dropless | padded cf 1.25 | payload | payload max dev. | payload cf 1.25 "
                  "(dropped) | dedup | all-gather | padded / all-gather | padded / payload | HLO fwd | HLO fwd+bwd |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            meas = next(iter(r["measured"].values())) if "measured" in r else None
            pay = _payload(r)
            hlo = r.get("hlo_dropless")
            lines.append(
                f"| {r['ep']} | {r['capacity_dropless']} | {_mib(r['padded_dropless'])} | {_mib(r['padded_cf'])} | "
                f"{_mib(pay)} | {_mib(meas['payload_max']) if meas else '-'} | "
                + (f"{_mib(meas['payload_cf'])} ({meas['dropped_fraction_cf']:.1%})" if meas else "-") + " | "
                f"{_mib(_payload(r, 'payload_dedup'))} | {_mib(r['allgather'])} | "
                f"{r['padded_dropless'] / r['allgather']:.2f} | {r['padded_dropless'] / pay:.1f} | "
                + (f"{_mib(hlo['forward'])} | {_mib(hlo['forward_backward'])} |" if hlo else "- | - |"))
        if name == "tiny":
            lines += ["", "Uniform random top-K on the same shape (payload / dedup, MiB): " + ", ".join(
                f"EP {r['ep']}: {_mib(r['measured']['uniform']['payload'])} / "
                f"{_mib(r['measured']['uniform']['payload_dedup'])}" for r in rows)]
        lines.append("")
    lines += ["## Bytes one device sends per pipelined training step, MiB", "",
              "Counted from the executor's op table (`ep_traffic.pipelined_step_bytes`, the busiest rank): the "
              "`ppermute`s of every tick (activations and gradients on each of the schedule's channels, idle ranks "
              "included: one SPMD program) and of the module slots fetched and returned, and the all-to-alls of "
              "every F, B and I (forward: dispatch + combine + ids per MoE layer; backward: the same rows without "
              "the ids); the last stage's ops add the MTP block's MoE layer. The 58 MoE layers of DeepSeek-V3 are "
              "counted as 4 per stage (the largest stage).", "",
              "| layout | ticks | tokens / device / micro-batch | C | ppermute | all-to-all |",
              "|---|---|---|---|---|---|"]
    for r in result["pipelined"]:
        lines.append(f"| {r['layout']} | {r['ticks']} | {r['tokens_per_device_per_microbatch']} | {r['capacity']} | "
                     f"{_mib(r['ppermute'])} | {_mib(r['all_to_all'])} |")
    lines += ["", "HLO columns: off-device bytes of the all-to-alls in the lowered `ep_dispatch` program (dropless), "
              "forward and forward + backward: they match the padded column (forward) and twice its rows (backward "
              "re-sends dispatch and combine rows, not the ids).", "",
              f"## Training step time, tiny model, batch {_BATCH.value} x {_SEQ.value}", "",
              "| mesh | dispatch | tokens/device | ms/step (median) | compile s | temp MiB/device | "
              "expert rows x local experts / device / layer | collectives in the program | first-step loss | "
              "dropped pairs |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["step_time"]:
        lines.append(f"| {r['label']} (data={r['data']}, expert={r['expert']}) | {r['moe_dispatch']} | "
                     f"{r['tokens_per_device']} | {1e3 * r['seconds_per_step']:.0f} | {r['compile_seconds']:.0f} | "
                     f"{r['temp_bytes_per_device'] / 2**20:.1f} | "
                     f"{r['expert_rows_per_device']} x {r['local_experts']} | "
                     + ", ".join(f"{k} {v}" for k, v in r["collectives"].items()) + " | "
                     f"{r['first_step_loss']:.6f} | {r['dropped_fraction_first_step']:.1%} |")
    loads = ", ".join(f"{x:.1f}" for x in result["load_average_per_round"])
    rounds = len(result["load_average_per_round"])
    lines += ["", f"Steps timed in {rounds} interleaved rounds (one step of each mesh per round; medians, all times "
              f"in the JSON); 1-minute load average after each round: {loads}.",
              "", m["note"], "", STEP_NOTES, "", "Checks: " + "; ".join(f"{k}: {'ok' if v else 'FAILED'}"
                                                     for k, v in result["checks"].items()) + ".", ""]
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, (name, layer) in zip(axes, LAYERS.items()):
        rows = result["bytes"][name]
        eps = [r["ep"] for r in rows]
        series = [("ours, padded buffer (dropless)", [r["padded_dropless"] for r in rows], "o-", "C3"),
                  (f"ours, padded buffer (cf {CAPACITY_FACTOR})", [r["padded_cf"] for r in rows], "o--", "C1"),
                  ("payload (ragged_all_to_all)", [_payload(r) for r in rows], "s-", "C0"),
                  ("payload, one row per (token, device)", [_payload(r, "payload_dedup") for r in rows], "s:", "C9"),
                  ("all-gather + reduce-scatter", [r["allgather"] for r in rows], "^-", "C2")]
        for label, values, style, color in series:
            ax.plot(eps, np.asarray(values) / 2**20, style, color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(eps, [str(e) for e in eps])
        ax.set_xlabel("expert-parallel size EP")
        ax.set_ylabel("MiB sent per device per MoE layer (forward)")
        ax.set_title(f"{name}: D={layer['D']}, E={layer['E']}, K={layer['K']}, n={layer['n']}/device"
                     + (" (EP 64 analytic)" if 64 in eps else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[2]
    runs = result["step_time"]
    ax.bar(range(len(runs)), [1e3 * r["seconds_per_step"] for r in runs],
           color=["C7"] + ["C0"] * (len(runs) - 1))
    ax.set_xticks(range(len(runs)), [r["label"] for r in runs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ms per training step (median)")
    ax.set_title(f"tiny model step, {_BATCH.value} x {_SEQ.value} tokens, 8 simulated devices on "
                 f"{os.cpu_count()} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sanity_checks(result: dict) -> dict:
    """What must hold if the numbers are right; printed and stored, not asserted (the run is long)."""
    checks = {}
    for name, rows in result["bytes"].items():
        ag = [r["allgather"] for r in rows]
        checks[f"{name}: all-gather grows with EP"] = all(a < b for a, b in zip(ag, ag[1:]))
        checks[f"{name}: payload <= padded cf <= padded dropless"] = all(
            _payload(r) <= r["padded_cf"] <= r["padded_dropless"] for r in rows)
        checks[f"{name}: dedup <= payload"] = all(_payload(r, "payload_dedup") <= _payload(r) for r in rows)
        lowered = [r for r in rows if "hlo_dropless" in r]
        checks[f"{name}: lowered all-to-alls == dispatch_bytes (forward)"] = all(
            r["hlo_dropless"]["forward"] == r["padded_dropless"] and r["hlo_cf"]["forward"] == r["padded_cf"]
            for r in lowered)
        checks[f"{name}: forward + backward == 2 x forward - ids"] = all(
            r["hlo_dropless"]["forward_backward"] == 2 * r["padded_dropless"] - r["dispatch_bytes_dropless"]["ep_ids"]
            for r in lowered)
    dropless = [r["first_step_loss"] for r in result["step_time"] if r["capacity_factor"] == 0]
    checks["step: first-step loss equal on every dropless mesh (1e-5)"] = bool(np.ptp(dropless) < 1e-5)
    for k, v in checks.items():
        print(("ok   " if v else "FAIL ") + k)
    return checks


def main(argv) -> None:
    del argv
    started = time.perf_counter()
    result = {"machine": machine(), "capacity_factor": CAPACITY_FACTOR,
              "layers": {k: {a: v for a, v in layer.items() if a != "dtype"} for k, layer in LAYERS.items()},
              "bytes": {name: bytes_table(name, layer) for name, layer in LAYERS.items()},
              "pipelined": pipelined_bytes(),
              "bytes_seconds": time.perf_counter() - started,
              "definitions": {
                  "padded_*": "bytes one device sends per MoE layer, forward, in our padded all_to_all buffers "
                              "(dispatch_bytes ep_total: dispatch + combine + int32 ids)",
                  "payload": "off-device (token, expert) rows, both ways, + 4 bytes id each: what ragged_all_to_all "
                             "would move (mean over source devices; payload_max the busiest)",
                  "payload_dedup": "one row per (token, destination device), both ways (DeepEP-style)",
                  "allgather": "all-gather of the tokens + reduce-scatter of the outputs",
                  "hlo_*": "off-device bytes of the all_to_alls in the lowered ep_dispatch program"}}
    result["step_time"], result["load_average_per_round"] = step_times()
    result["checks"] = sanity_checks(result)
    result["seconds"] = time.perf_counter() - started
    out = pathlib.Path(_OUT_DIR.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ep.json").write_text(json.dumps(result, indent=2))
    (out / "bench_ep.md").write_text(markdown(result))
    plot(result, out / "bench_ep.png")
    print(markdown(result))
    print(f"wrote {out}/bench_ep.{{json,md,png}} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    app.run(main)
