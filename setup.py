"""Installs inq_jax, comq_jax and the experiments that use them."""

import setuptools

setuptools.setup(
    name="inq-jax",
    version="0.1.0",
    description=("Low-bit weight quantization for Flax models: INQ "
                 "(incremental power-of-two) and COMQ (post-training)."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(
        include=["inq_jax*", "comq_jax*", "experiments*", "configs*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets>=4.9.10",
        "tensorflow-cpu>=2.21",
        "absl-py",
        "ml-collections>=1.1",
        "numpy",
        "scikit-learn",
        "safetensors",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "nbclient", "nbformat", "ipykernel"],
    },
)
