"""The package's layering, read from its imports (stdlib ast): each failure names the offending import.

    checks, host_memory <- ops, data <- model, defaults <- parallel, convert <- train <- infer <- rl <- cli <- mains

A module may import its own package and the packages of lower layers, nothing of its own layer's other
packages or above; every `deepseek_jax` import sits at the top of its module (a function-local import
would hide an edge); no module imports a main; the module-level imports have no cycle; and only
parallel/pipeline/_jax_internals.py imports `jax._src`.
"""

import ast
import pathlib

import pytest

from deepseek_jax.parallel.pipeline import _jax_internals

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "deepseek_jax"
LAYERS = (("checks", "host_memory"), ("ops", "data"), ("model", "defaults"), ("parallel", "convert"), ("train",),
          ("infer",), ("rl",), ("cli",))
TOP_LEVEL_MAINS = ("generate", "grpo", "evaluate", "params", "plan")
JAX_INTERNALS = "deepseek_jax.parallel.pipeline._jax_internals"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_main(module: str) -> bool:
    parts = module.split(".")
    return parts[-1] == "__main__" or (len(parts) == 2 and parts[1] in TOP_LEVEL_MAINS)


def package_of(module: str) -> str:
    return module.split(".")[1] if module != "deepseek_jax" else ""


def layer_of(module: str) -> int:
    """Index into LAYERS; mains above every layer."""
    if is_main(module):
        return len(LAYERS)
    for i, packages in enumerate(LAYERS):
        if package_of(module) in packages:
            return i
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS in tests/test_layering.py")


def imports(path: pathlib.Path):
    """(line, imported module, at module level) of every import in the file; `from a import b` names a.b
    when that is a module of ours, else a."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                yield node.lineno, name if name in MODULES else node.module, id(node) in top


def ours(name: str) -> bool:
    return name == "deepseek_jax" or name.startswith("deepseek_jax.")


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}"


def test_every_module_has_a_layer():
    for module in MODULES:
        if module != "deepseek_jax":
            layer_of(module)


def test_imports_follow_the_layers():
    bad = []
    for module, path in MODULES.items():
        if module == "deepseek_jax":
            continue
        for line, name, _ in imports(path):
            if not ours(name) or name == "deepseek_jax":
                continue
            if is_main(name):
                bad.append(f"{where(module, line)} imports the main {name}: nothing imports a main")
            elif package_of(name) != package_of(module) and layer_of(name) >= layer_of(module):
                bad.append(f"{where(module, line)} imports {name}: {package_of(module) or module} (layer "
                           f"{layer_of(module)}) may only import lower layers, not {package_of(name)} (layer "
                           f"{layer_of(name)})")
    assert not bad, "\n".join(bad)


def test_no_function_local_imports_of_the_package():
    bad = [f"{where(module, line)} imports {name} inside a function or block: import it at the top (if that "
           "makes a cycle or breaks the layering, the edge is the problem)"
           for module, path in MODULES.items() for line, name, top in imports(path) if ours(name) and not top]
    assert not bad, "\n".join(bad)


def test_module_imports_have_no_cycle():
    graph = {m: sorted({n for _, n, top in imports(p) if top and n in MODULES and n != m}) for m, p in MODULES.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)


def test_only_the_shim_imports_jax_internals():
    bad = [f"{where(module, line)} imports {name}: go through {JAX_INTERNALS}"
           for module, path in MODULES.items() if module != JAX_INTERNALS
           for line, name, _ in imports(path) if name == "jax._src" or name.startswith("jax._src.")]
    assert not bad, "\n".join(bad)


def test_the_shim_refuses_an_untested_jax():
    _jax_internals.check_version()  # The installed one is in range.
    with pytest.raises(ImportError, match=r"jax 0\.9\.1 is installed.*widen"):
        _jax_internals.check_version("0.9.1")
    with pytest.raises(ImportError, match=r"jax 0\.11\.0 is installed"):
        _jax_internals.check_version("0.11.0")


def test_the_checker_sees_a_bad_edge(tmp_path):
    """The checks can fail: a function-local upward import is found in a made-up module."""
    source = "def f():\n    from deepseek_jax.rl import trainer\n"
    path = tmp_path / "m.py"
    path.write_text(source)
    found = list(imports(path))
    assert found == [(2, "deepseek_jax.rl.trainer", False)]
    assert layer_of("deepseek_jax.rl.trainer") > layer_of("deepseek_jax.model.mla")


def test_only_the_model_defines_modules():
    """One forward: no Flax module (a block, an MTP module, a head) is written outside model/."""
    bad = []
    for module, path in MODULES.items():
        if package_of(module) == "model":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b) in ("nn.Module", "flax.linen.Module", "Module")
                                                      for b in node.bases):
                bad.append(f"{where(module, node.lineno)} defines the Flax module {node.name}: build it in model/")
    assert not bad, "\n".join(bad)
