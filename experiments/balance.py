"""Auxiliary-loss-free balancing vs no balancing vs an auxiliary-loss baseline, on the tiny model.

    python experiments/balance.py [--steps=200] [--batch_size=4]

Three runs of configs/tiny.py from the same seed and data, differing only in how expert load is balanced:
  loss_free:  bias update gamma = 1e-3 (V3), sequence-wise balance loss alpha = 1e-4 (V3)
  loss_free_fast: gamma = 1e-2: V3's gamma suits hundreds of thousands of steps; in a few hundred
              the bias can move only steps x gamma, so a short run needs a faster update
  none:       gamma = 0, alpha = 0
  aux_loss:   gamma = 0, alpha = 1e-2 (a conventional auxiliary loss, 100x V3's tiny alpha)
Writes experiments/results/balance.json (MaxVio and loss per step, final averages) and balance.png.
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from deepseek_jax import defaults  # noqa: E402
from deepseek_jax.train.metrics import read_csv  # noqa: E402
from deepseek_jax.train.pretrain import train_and_evaluate  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps per run.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Rows of 256 bytes per step.")
_ONLY = flags.DEFINE_list("variants", [], "Run only these variants, keeping the others' results from an "
                          "existing balance.json (same steps and batch size).")

VARIANTS = {
    "loss_free": {"bias_update_speed": 1e-3, "balance_alpha": 1e-4},
    "loss_free_fast": {"bias_update_speed": 1e-2, "balance_alpha": 1e-4},
    "none": {"bias_update_speed": 0.0, "balance_alpha": 0.0},
    "aux_loss": {"bias_update_speed": 0.0, "balance_alpha": 1e-2},
}


def run(name: str, steps: int, workdir: str) -> dict:
    config = defaults.load_config(str(ROOT / "configs" / "tiny.py"))
    config.data.batch_size = _BATCH.value
    config.train.update(steps=steps, warmup_steps=min(30, steps // 5), log_every=1, eval_every=steps,
                        eval_batches=8, sample_tokens=0, ema_decay=0.0, **VARIANTS[name])
    config.checkpoint.every = steps
    summary = train_and_evaluate(config, workdir)
    columns = read_csv(str(pathlib.Path(workdir) / "metrics.csv"))
    has_loss = ~np.isnan(columns["loss"])
    return {"settings": VARIANTS[name], "step": columns["step"][has_loss].tolist(),
            "max_vio": columns["max_vio"][has_loss].tolist(), "main_loss": columns["main_loss"][has_loss].tolist(),
            "final_eval_bpb": summary["final_eval_bpb"]}


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    steps = _STEPS.value
    results = {}
    previous = RESULTS / "balance.json"
    if _ONLY.value and previous.exists():
        old = json.loads(previous.read_text())
        if (old["steps"], old.get("batch_size")) == (steps, _BATCH.value):
            results.update(old["runs"])
    with tempfile.TemporaryDirectory() as tmp:
        for name in _ONLY.value or VARIANTS:
            results[name] = run(name, steps, f"{tmp}/{name}")
    results = {name: results[name] for name in VARIANTS if name in results}
    tail = max(steps // 4, 1)
    for r in results.values():
        r["mean_max_vio_last_quarter"] = float(np.mean(r["max_vio"][-tail:]))
        r["mean_main_loss_last_quarter"] = float(np.mean(r["main_loss"][-tail:]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "balance.json").write_text(json.dumps({"config": "configs/tiny.py", "steps": steps,
                                                       "batch_size": _BATCH.value, "runs": results}, indent=1))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for name, r in results.items():
        a.plot(r["step"], r["max_vio"], label=name)
        b.plot(r["step"], r["main_loss"], label=name)
    a.set(title="MaxVio (mean over MoE layers)", xlabel="step", yscale="log")
    b.set(title="next-token loss (nats)", xlabel="step")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "balance.png", dpi=120)
    for name, r in results.items():
        print(f"{name:>10}: MaxVio(last quarter) {r['mean_max_vio_last_quarter']:.3f}  "
              f"loss {r['mean_main_loss_last_quarter']:.3f}  eval bpb {r['final_eval_bpb']:.3f}")


if __name__ == "__main__":
    app.run(main)
