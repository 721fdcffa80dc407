"""experiments/step_profile.py's reading of a compiled program (the step profile of bench_vs_torch.py)."""

import jax
import jax.numpy as jnp
import step_profile


def test_layout_copies_are_the_materialised_transposes():
    """A transpose the program must write out is found; an elementwise program has none."""
    x = jnp.ones((64, 32), jnp.float32)
    transposed = jax.jit(lambda x: jnp.sin(x).T + 1.0).lower(x).compile().as_text()
    elementwise = jax.jit(lambda x: jnp.sin(x) + 1.0).lower(x).compile().as_text()
    assert step_profile.layout_copies(transposed)
    assert step_profile.layout_copies(transposed) <= set(step_profile.instructions(transposed))
    assert not step_profile.layout_copies(elementwise)
