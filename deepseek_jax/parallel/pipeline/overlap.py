"""What an asynchronous collective scheduler may overlap, read from a compiled program's HLO text.

A collective can run while a computation runs only if neither depends on the other and both sit in
the same HLO computation (a scheduler orders the instructions of one computation; it does not move
work into or out of a loop body or a conditional branch). CPU XLA runs collectives synchronously, so
there this dependency structure is all that can be checked; GPU and TPU XLA turn it into overlap.

    graph = computations(compiled.as_text())           {computation: {instruction: Instruction}}
    pair_all_to_alls(graph, forward_scope, backward_scope) -> [AllToAll]
        for the computation that runs both named scopes (an interleaved F&B pair, execute.py), every
        all-to-all, which half it belongs to, and the compute of the other half it is independent of.
"""

from __future__ import annotations

import dataclasses
import functools
import re

COMPUTE = ("dot", "convolution")  # what counts as compute: matmuls, and fusions or calls containing one


@dataclasses.dataclass(frozen=True)
class Instruction:
    opcode: str
    operands: tuple[str, ...]  # data operands and control predecessors
    op_name: str  # the JAX name stack it came from ('' when XLA dropped it, e.g. in some fusions)
    called: tuple[str, ...]  # computations it calls (fusion bodies, branches, loop bodies)


def computations(text: str) -> dict[str, dict[str, Instruction]]:
    """{computation name: {instruction name: Instruction}} from (optimized) HLO text."""
    comps: dict[str, dict[str, Instruction]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = comps.setdefault(header.group(1), {})
            continue
        m = re.match(r"^\s*(?:ROOT )?%(\S+) = (.*)$", line)
        if current is None or not m:
            continue
        rest = m.group(2)
        if rest.startswith("("):  # a tuple type: skip to its closing parenthesis
            depth = 0
            for j, ch in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    rest = rest[j + 1:]
                    break
        op = re.match(r"\s*(?:\S+\s+)?([a-z][\w\-]*)\(", rest)
        depth, args = 0, ""
        for ch in rest[op.end() - 1:]:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            args += ch
            if depth == 0:
                break
        control = re.search(r"control-predecessors=\{([^}]*)\}", rest)  # ordering edges count too
        name = re.search(r'op_name="([^"]*)"', rest)
        called = re.findall(r"(?:calls|to_apply|body|condition)=%([\w\.\-]+)", rest)
        branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
        called += re.findall(r"%([\w\.\-]+)", branches.group(1)) if branches else []
        operands = re.findall(r"%([\w\.\-]+)", args + (control.group(1) if control else ""))
        current[m.group(1)] = Instruction(opcode=op.group(1), operands=tuple(operands),
                                          op_name=name.group(1) if name else "", called=tuple(called))
    return comps


def ancestors(graph: dict[str, Instruction], name: str) -> set[str]:
    """Every instruction of the computation `name` depends on."""
    seen, todo = set(), [name]
    while todo:
        inst = graph.get(todo.pop())
        for parent in inst.operands if inst else ():
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def independent(graph: dict[str, Instruction], a: str, b: str, lineage: dict[str, set[str]] | None = None) -> bool:
    """Neither of the two instructions depends on the other."""
    anc = (lambda n: lineage[n]) if lineage is not None else (lambda n: ancestors(graph, n))
    return a not in anc(b) and b not in anc(a)


def _contains(comps: dict, name: str, opcodes: tuple[str, ...]) -> bool:
    @functools.cache
    def has(computation: str) -> bool:
        return any(i.opcode in opcodes or any(has(c) for c in i.called) for i in comps.get(computation, {}).values())

    return has(name)


@dataclasses.dataclass(frozen=True)
class AllToAll:
    """One all-to-all of an interleaved pair's computation.

    name: the instruction (in `computation`, or in a computation nested in it, then `via` is the
      instruction of `computation` that calls it, e.g. a conditional).
    half: the scope it came from (the forward or the backward half's).
    layer: its JAX name stack below the half's scope (which layer and module sent it).
    independent_compute: instructions of `computation` with compute (COMPUTE) that belong to the other
      half and neither feed it (or `via`) nor consume it.
    """

    computation: str
    name: str
    via: str | None
    half: str
    layer: str
    independent_compute: tuple[str, ...]


def pair_all_to_alls(comps: dict[str, dict[str, Instruction]], forward_scope: str,
                     backward_scope: str) -> list[AllToAll]:
    """The all-to-alls of the computation (the interleaved pair's branch) that holds top-level
    all-to-alls of both scopes, each with the other half's compute it is independent of. A compute
    instruction belongs to a half when the scoped instructions it depends on or that depend on it are
    of that half only (XLA drops the name stack of some fusions, so their half is read from their
    neighbours). Raises ValueError if no computation runs both halves' all-to-alls."""
    scopes = (forward_scope, backward_scope)

    def scope(inst: Instruction) -> str | None:
        found = [s for s in scopes if f"/{s}/" in inst.op_name]
        return found[0] if found else None

    def nested_all_to_alls(inst: Instruction) -> list[tuple[str, Instruction]]:
        out = []
        for c in inst.called:
            for n, i in comps.get(c, {}).items():
                out += [(n, i)] if i.opcode.startswith("all-to-all") else nested_all_to_alls(i)
        return out

    candidates = [name for name, graph in comps.items()
                  if {scope(i) for i in graph.values() if i.opcode.startswith("all-to-all")} >= set(scopes)]
    if not candidates:
        raise ValueError(f"no computation holds all-to-alls of both {forward_scope!r} and {backward_scope!r}")
    (computation,) = candidates
    graph = comps[computation]
    lineage = {n: ancestors(graph, n) for n in graph}
    descendants: dict[str, set[str]] = {n: set() for n in graph}
    for n, anc in lineage.items():
        for a in anc:
            descendants.setdefault(a, set()).add(n)
    scoped = {n: scope(i) for n, i in graph.items() if scope(i) is not None}

    def halves_of(n: str) -> set[str]:
        related = lineage[n] | descendants[n] | {n}
        return {scoped[r] for r in related if r in scoped}

    compute = [n for n, i in graph.items()
               if i.opcode in COMPUTE or any(_contains(comps, c, COMPUTE) for c in i.called)]
    half_of = {n: next(iter(h)) for n in compute if len(h := halves_of(n)) == 1}
    found = []
    for n, inst in graph.items():
        for name, a2a, via in ([(n, inst, None)] if inst.opcode.startswith("all-to-all")
                               else [(m, i, n) for m, i in nested_all_to_alls(inst)]):
            half = scope(a2a)
            here = via or name
            other = [c for c in compute if half_of.get(c) not in (None, half) and independent(graph, here, c, lineage)]
            found.append(AllToAll(computation=computation, name=name, via=via, half=half,
                                  layer=a2a.op_name.split(f"/{half}/", 1)[-1], independent_compute=tuple(other)))
    return found
