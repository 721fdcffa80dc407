"""DeepSeek Sparse Attention's two training stages (V3.2 report, section 2.1.1) on the tiny model of `make train`.

    python experiments/dsa_stages.py [--dense=runs/tiny]

Runs the commands of configs/tiny_dsa.py's docstring (a fresh workdir each):
  1. dense warm-up from the dense run: the model frozen, attention dense, the new lightning indexers learn the
     head-summed attention by KL (runs/tiny_dsa_warmup);
  2. sparse training from the warm-up: every query attends to its top 64 of up to 256 keys; the model trains
     through the mask, the indexers keep their KL on the selected keys (runs/tiny_dsa).
Writes experiments/results/dsa_stages.json: each stage's validation bits/byte and indexer KL by step, beside
the dense run's final validation.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def curves(workdir: pathlib.Path) -> dict:
    """{metric: [[step, value], ...]} of the validation bits/byte and the indexer KL in a run's metrics.csv."""
    with open(workdir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {name: [[int(r["step"]), float(r[name])] for r in rows if r.get(name)]
            for name in ("eval_bpb", "indexer_kl")}


def train(stage: str, init_from: pathlib.Path, workdir: pathlib.Path) -> dict:
    if workdir.exists():
        shutil.rmtree(workdir)
    command = [sys.executable, "-m", "deepseek_jax.train", f"--config=configs/tiny_dsa.py:stage={stage}",
               f"--config.train.init_from={init_from}", f"--workdir={workdir}"]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    summary = json.loads((workdir / "summary.json").read_text())
    return {"command": "python " + " ".join(command[1:]), "summary": summary, **curves(workdir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="runs/tiny", help="A `make train` run (configs/tiny.py).")
    args = parser.parse_args()
    dense = ROOT / args.dense
    if not (dense / "summary.json").is_file():
        raise SystemExit(f"{dense} holds no finished run: run `make train` first.")
    result = {"dense": {"workdir": args.dense, "summary": json.loads((dense / "summary.json").read_text())},
              "load_average_before": os.getloadavg()}
    result["dense_warmup"] = train("dense_warmup", dense, ROOT / "runs" / "tiny_dsa_warmup")
    result["sparse"] = train("sparse", ROOT / "runs" / "tiny_dsa_warmup", ROOT / "runs" / "tiny_dsa")
    result["load_average_after"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dsa_stages.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {RESULTS / 'dsa_stages.json'}.")


if __name__ == "__main__":
    main()
