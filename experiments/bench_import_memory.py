"""Peak host memory (RSS) of importing a Hugging Face checkpoint much larger than its largest tensor.

Writes a synthetic random DeepSeek-V3-shaped checkpoint (~200M parameters: ~400 MB in bfloat16, ~200 MB in
FP8), then imports it in fresh subprocesses and records ru_maxrss:
  * `single`:  load_checkpoint onto one CPU device (each variable is assembled whole on the host once),
  * `mesh8`:   onto 8 simulated CPU devices with every variable split 8 ways (experts over experts),
  * `naive`:   the simple alternative for contrast: every tensor read into host memory, then converted
               (bfloat16 only: safetensors' numpy loader cannot read FP8).
Peak RSS is VmHWM, reset after the imports (ru_maxrss would include the parent process's peak).
On CPU the imported variables themselves live in host memory, so the interesting number is the transient:
peak RSS minus RSS after the import (= output + whatever the streaming keeps alive at its worst moment).

    python experiments/bench_import_memory.py   # -> experiments/results/bench_import_memory.json
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "bench_import_memory.json"
MODEL = dict(
    vocab_size=16384, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=6,
    num_attention_heads=8, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
    topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
    first_k_dense_replace=1, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096, rms_norm_eps=1e-6,
    num_nextn_predict_layers=1)
MB = 2**20


def _status_mb(field: str) -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """Peak RSS since the last `reset_peak` (VmHWM; ru_maxrss would include the parent's peak)."""
    return _status_mb("VmHWM")


def reset_peak() -> None:
    pathlib.Path("/proc/self/clear_refs").write_text("5")


def write_checkpoints(root: pathlib.Path) -> dict:
    import jax
    import numpy as np

    from deepseek_jax import convert, model
    from deepseek_jax.convert.safetensors_io import DTYPES, CheckpointFiles

    cfg = model.ModelConfig.from_dict(MODEL)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: (rng.standard_normal(s.shape, dtype=np.float32) * 0.02),
                             model.abstract_variables(cfg))
    info = {"params": int(sum(x.size for x in jax.tree.leaves(variables)))}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        convert.save_checkpoint(cfg, variables, str(root / dtype), dtype=dtype, max_shard_bytes=64 * MB)
        files = CheckpointFiles(root / dtype)
        sizes = {n: int(np.prod(t.shape)) * DTYPES[t.dtype].itemsize
                 for n, t in files.tensors.items()}
        largest = max(sizes, key=sizes.get)
        info[dtype] = dict(checkpoint_mb=sum(sizes.values()) / MB,
                           shards=len(list((root / dtype).glob("*.safetensors"))),
                           largest_tensor=largest, largest_tensor_mb=sizes[largest] / MB,
                           largest_tensor_f32_mb=int(np.prod(files.tensors[largest].shape)) * 4 / MB)
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    path, biggest = max(leaves, key=lambda kv: kv[1].size)
    info["largest_variable"] = jax.tree_util.keystr(path)
    info["largest_variable_f32_mb"] = biggest.nbytes / MB
    info["output_f32_mb"] = sum(x.nbytes for x in jax.tree.leaves(variables)) / MB
    return info


def child(mode: str, checkpoint: str) -> None:
    """Runs one import in this (fresh) process and prints a JSON record."""
    if mode == "mesh8":
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from deepseek_jax import convert, model

    jax.numpy.zeros(1).block_until_ready()
    reset_peak()
    base_rss = rss_mb()
    start = time.perf_counter()
    if mode == "naive":
        from safetensors.numpy import load_file

        everything = {}
        for file in sorted(pathlib.Path(checkpoint).glob("*.safetensors")):
            everything.update(load_file(str(file)))
        variables = {n: jax.device_put(t.astype(np.float32)) for n, t in everything.items()}
    else:
        kwargs = {}
        if mode == "mesh8":
            mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
            cfg = convert.from_hf(json.loads((pathlib.Path(checkpoint) / "config.json").read_text()))[0]

            def split8(path, leaf):  # Every variable 8 ways: the expert axis if it has one, else the first fit.
                names = [k.key for k in path]
                axis = (1 if "layers" in names[1] else 0) if "experts" in names else next(
                    (i for i, d in enumerate(leaf.shape) if d % 8 == 0), None)
                spec = [None] * len(leaf.shape)
                if axis is not None:
                    spec[axis] = "x"
                return NamedSharding(mesh, PartitionSpec(*spec))

            kwargs["shardings"] = jax.tree_util.tree_map_with_path(split8, model.abstract_variables(cfg))
        _, variables = convert.load_checkpoint(checkpoint, **kwargs)
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    output = sum(x.nbytes for x in jax.tree.leaves(variables)) / MB
    end_rss, peak = rss_mb(), peak_mb()
    print(json.dumps(dict(mode=mode, seconds=round(seconds, 2), baseline_rss_mb=round(base_rss, 1),
                          peak_rss_mb=round(peak, 1),
                          rss_after_mb=round(end_rss, 1), output_mb=round(output, 1),
                          peak_above_baseline_mb=round(peak - base_rss, 1),
                          transient_mb=round(peak - end_rss, 1))))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        info = write_checkpoints(root)
        runs = []
        for fmt in ("bfloat16", "float8_e4m3fn"):
            for mode in ("single", "mesh8") + (("naive",) if fmt == "bfloat16" else ()):
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(root / fmt)], check=True,
                                     capture_output=True, text=True, cwd=ROOT).stdout
                record = dict(json.loads(out.strip().splitlines()[-1]), checkpoint=fmt)
                print(record, flush=True)
                runs.append(record)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(dict(model=MODEL, checkpoints=info, runs=runs), indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
