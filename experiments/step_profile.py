"""XLA:CPU's per-op timings of one compiled program, sorted into the parts of a DeepSeek-V3 step.

    profile = profile_compiled(compiled, run, steps=3)   # run() executes the program once
    profile.seconds_by_category                          # {'expert GEMMs': ..., 'attention': ..., ...}
    profile.layout_copy_seconds                          # transposes and copies XLA materialises

`jax.profiler` records one event per executed XLA instruction (a thunk) on the executor's threads; the
compiled program's text maps each instruction's name to its opcode and the Python stack that emitted it
(the HLO module's FileNames / FunctionNames / FileLocations / StackFrames tables), and the innermost
frame in deepseek_jax (or optax) names the part:

    expert GEMMs        dots in model/experts.py (the routed experts' grouped GEMMs)
    expert dispatch     the rest of model/experts.py: sort, gather, scatter, masks, combine
    router / gate       model/moe.py: router matmul, sigmoid, group-limited top-k, balance statistics
    dense GEMMs         dots of `Linear` (model/layers.py): attention projections, dense MLP, shared
                        experts, MTP projection
    attention           the rest of model/mla.py and model/rope.py: scores, mask, softmax, RoPE
    head + loss         the output head's dot, train/losses.py and optax's cross-entropy
    norms / elementwise RMSNorm, SwiGLU's silu * up, residual adds, casts
    optimizer           optax's update (AdamW, clipping, schedule), train/step.py, train/balance.py
    layer loop          instructions of the scan over layers itself (while, dynamic slices, copies)
    other               anything else

Host overhead is the step's wall time minus the time at least one executor thread was busy.
Used by experiments/bench_vs_torch.py (--profile); importable on its own.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import re
import tempfile
import time
from collections.abc import Callable

import jax

CATEGORIES = ("expert GEMMs", "expert dispatch", "router / gate", "dense GEMMs", "attention", "head + loss",
              "norms / elementwise", "optimizer", "layer loop", "other")
_DOTS = ("dot", "convolution")  # opcodes (or fusion kinds) that are matrix products
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+.*? (\w[\w\-]*)\((.*)$")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")


@dataclasses.dataclass(frozen=True)
class Instruction:
    opcode: str  # the HLO opcode; for a fusion, "fusion:<kind>" plus the root's opcode when known
    op_name: str
    frames: tuple[tuple[str, str], ...]  # (file, function) innermost first
    # A transpose or copy written out: `transpose` and `copy` themselves, and fusions whose computation holds
    # a transpose and a copy (XLA:CPU fuses the elementwise work producing a GEMM operand with the transpose
    # into the layout the GEMM wants).
    copies_layout: bool = False


def _tables(text: str) -> dict[str, dict[int, str]]:
    """The module's stack-frame tables: {'FileNames': {id: row}, ...}."""
    tables, current = {}, None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        if current is not None:
            match = _TABLE_ROW.match(line)
            if match:
                current[int(match.group(1))] = match.group(2)
            elif line.strip():
                current = None
    return tables


def _frames(tables: dict, frame_id: int) -> tuple[tuple[str, str], ...]:
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locations, frames = tables.get("FileLocations", {}), tables.get("StackFrames", {})
    chain, seen = [], set()
    while frame_id and frame_id not in seen and frame_id in frames:
        seen.add(frame_id)
        row = frames[frame_id]
        location = int(re.search(r"file_location_id=(\d+)", row).group(1))
        parent = int(re.search(r"parent_frame_id=(\d+)", row).group(1))
        loc = locations.get(location, "")
        file_id = int(re.search(r"file_name_id=(\d+)", loc).group(1)) if "file_name_id" in loc else 0
        function_id = int(re.search(r"function_name_id=(\d+)", loc).group(1)) if "function_name_id" in loc else 0
        chain.append((files.get(file_id, "").strip('"'), functions.get(function_id, "").strip('"')))
        frame_id = parent if parent != frame_id else 0
    return tuple(chain)


def instructions(hlo_text: str) -> dict[str, Instruction]:
    """Every instruction of every computation of a compiled module's text, by name."""
    tables = _tables(hlo_text)
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.S | re.M)}
    found = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.group(1), match.group(2)
        called = re.search(r"calls=%([\w.\-]+)", line) if opcode == "fusion" else None
        body = bodies.get(called.group(1), "") if called else ""
        copies = opcode in ("transpose", "copy") or (" transpose(" in body and " copy(" in body)
        if opcode == "fusion":
            kind = re.search(r"kind=(\w+)", line)
            opcode = f"fusion:{kind.group(1) if kind else ''}:{'dot' if 'ynn_fusion' in name else ''}"
        op_name = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        found[name] = Instruction(opcode, op_name.group(1) if op_name else "",
                                  _frames(tables, int(frame.group(1))) if frame else (), copies)
    return found


def layout_copies(hlo_text: str) -> set[str]:
    """The names of the instructions that write a transpose or a copy out (`Instruction.copies_layout`)."""
    return {name for name, instruction in instructions(hlo_text).items() if instruction.copies_layout}


def _is_dot(instruction: Instruction, name: str) -> bool:
    return instruction.opcode in _DOTS or instruction.opcode.endswith(":dot") or name.startswith(("dot", "ynn"))


def category(name: str, instruction: Instruction | None) -> str:
    """The part of the step an executed instruction belongs to (module docstring)."""
    if instruction is None:
        return "other"
    for file, function in instruction.frames:
        if "/optax/losses/" in file or file.endswith("train/losses.py"):
            return "head + loss"
        if "/optax/" in file or file.endswith(("train/step.py", "train/balance.py")):
            if file.endswith("train/step.py") and function in ("loss_and_metrics",):
                continue
            return "optimizer"
        if file.endswith("model/experts.py"):
            return "expert GEMMs" if _is_dot(instruction, name) else "expert dispatch"
        if file.endswith("model/moe.py"):
            if function.startswith("MLP") or "shared_experts" in instruction.op_name:
                continue
            return "router / gate"
        if file.endswith("model/layers.py"):
            if function.startswith(("Linear", "default_matmul")):
                if "lm_head" in instruction.op_name:
                    return "head + loss"
                return "dense GEMMs" if _is_dot(instruction, name) else "norms / elementwise"
            return "norms / elementwise"
        if file.endswith(("model/mla.py", "model/rope.py")):
            return "attention"
        if file.endswith(("model/block.py", "model/mtp.py")):
            return "norms / elementwise"
        if file.endswith("model/transformer.py"):
            if "lm_head" in instruction.op_name or function.endswith("logits"):
                return "head + loss"
            return "layer loop" if "/while" in instruction.op_name else "norms / elementwise"
    if instruction.opcode in ("while", "copy", "dynamic-slice", "dynamic-update-slice", "tuple",
                              "get-tuple-element", "parameter", "bitcast") or "/while" in instruction.op_name:
        return "layer loop"
    return "other"


@dataclasses.dataclass(frozen=True)
class StepProfile:
    wall_seconds: float  # per step
    busy_seconds: float  # per step: time at least one executor thread ran an instruction
    seconds_by_category: dict[str, float]  # per step, summed over threads
    top_instructions: list[tuple[str, str, float]]  # (instruction, category, seconds per step)
    layout_copy_seconds: float  # per step, summed over threads: instructions that copy a layout, across the categories

    @property
    def host_overhead_seconds(self) -> float:
        return max(self.wall_seconds - self.busy_seconds, 0.0)


def _union_seconds(intervals: list[tuple[int, int]]) -> float:
    total, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e9


def profile_compiled(compiled, run: Callable[[], object], steps: int = 3) -> StepProfile:
    """Traces `steps` calls of `run` (each executing `compiled` once; warm it up first)."""
    known = instructions(compiled.as_text())
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        start = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(run())
        wall = (time.perf_counter() - start) / steps
        jax.profiler.stop_trace()
        trace = jax.profiler.ProfileData.from_file(
            sorted(glob.glob(f"{directory}/**/*.xplane.pb", recursive=True))[-1])
    by_category, by_instruction = collections.Counter(), collections.Counter()
    intervals = []
    for plane in trace.planes:
        for line in plane.lines:
            for event in line.events:
                # Loops, calls and conditionals span the instructions they run: counted through those.
                if event.name not in known or known[event.name].opcode in ("while", "call", "conditional"):
                    continue
                by_instruction[event.name] += event.duration_ns / 1e9 / steps
                by_category[category(event.name, known[event.name])] += event.duration_ns / 1e9 / steps
                intervals.append((event.start_ns, event.start_ns + event.duration_ns))
    top = [(name, category(name, known[name]), seconds) for name, seconds in by_instruction.most_common(15)]
    return StepProfile(wall_seconds=wall, busy_seconds=_union_seconds(intervals) / steps,
                       seconds_by_category={c: by_category.get(c, 0.0) for c in CATEGORIES},
                       top_instructions=top,
                       layout_copy_seconds=sum(v for k, v in by_instruction.items() if known[k].copies_layout))
