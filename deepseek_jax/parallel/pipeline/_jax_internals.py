"""The JAX internals the B/I/W split needs (backward_split.py), behind one guard.

Partial evaluation of a jaxpr with some inputs known and dead-code elimination have no public API in
JAX; this module is the only one in the package that imports `jax._src`. It is tested with the
versions in TESTED (setup.py pins one of them); any other version fails at import with the reason,
instead of a wrong split or an AttributeError deep inside the executor.
"""

from __future__ import annotations

import jax

TESTED = ((0, 10, 0), (0, 11, 0))  # [low, high): the jax releases tests/test_execute.py was run with.


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def check_version(version: str = jax.__version__) -> None:
    """Raises ImportError unless `version` lies in the tested range."""
    low, high = TESTED
    if not low <= _version(version) < high:
        raise ImportError(
            f"deepseek_jax.parallel.pipeline splits a stage's backward with JAX internals "
            f"(jax._src.interpreters.partial_eval) tested with jax >= {'.'.join(map(str, low))}, "
            f"< {'.'.join(map(str, high))}; jax {version} is installed. Install the pinned versions "
            "(pip install -e . from the repository), or re-run tests/test_execute.py on this jax and widen "
            "TESTED in deepseek_jax/parallel/pipeline/_jax_internals.py.")


check_version()

from jax._src.interpreters import partial_eval as _pe  # noqa: E402  (after the version check)

convert_constvars_jaxpr = _pe.convert_constvars_jaxpr
dce_jaxpr = _pe.dce_jaxpr
partial_eval_jaxpr_nounits = _pe.partial_eval_jaxpr_nounits
partial_eval_jaxpr_nounits_fwd = _pe.partial_eval_jaxpr_nounits_fwd
