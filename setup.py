"""Installs m5p: five-modality SCALE pretraining in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="m5p",
    version="0.1.0",
    description="Five-modality product representation learning (SCALE on M5Product) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["m5p", "m5p.*"]),
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.0",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8.1",
        "grain>=0.2.12",
        "ml-collections>=1.1.0",
        "sentencepiece>=0.2.0",
        "absl-py>=2.1.0",
        "numpy>=2.0",
        "pillow>=11.0",
        "av>=14.0",
        "importlib_resources>=6.0",
        "scikit-learn>=1.5",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "ijson>=3.2",  # Streams a 6M-item <split>_id_label.json.
        "flatbuffers>=24.3",  # jax.export serialization (the serving export).
    ],
    extras_require={
        # jax[tpu] brings libtpu, whose compile-only mode lets tests/test_aot.py compile
        # for TPU topologies on a CPU (one ~250 MB wheel, kept in pip's cache).
        "test": ["pytest>=8.0", "apache-beam>=2.60", "pyyaml>=6.0", "jax[tpu]>=0.10.0"],
        "beam": ["apache-beam>=2.60"],  # Conversion on Beam (Dataflow, Flink, Spark).
        "gpu": ["jax[cuda12]>=0.10.0"],
        "tpu": ["jax[tpu]>=0.10.0"],
    },
)
