"""Write the latest student of a training workdir as an HF directory that transformers and vLLM
load: model.safetensors, config.json, generation_config.json (the base's, if it had one) and the
tokenizer files, all mode 0644.

    python -m omniopd_jax.tools.export --workdir DIR --out HF_DIR [--step N] [--dtype bfloat16]
"""

import json
import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "workdir", None, "Training workdir (holds config.json and checkpoints/).", required=True
)
flags.DEFINE_string("out", None, "Output HF directory.", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Saved dtype (default: as trained).")


def export(workdir: str, out: str, step: int | None = None, dtype: str | None = None) -> int:
  """Exports checkpoint `step` (default latest) of `workdir` to `out`; returns the step."""
  import jax
  import ml_collections
  from flax import nnx

  from omniopd_jax.models import hf
  from omniopd_jax.train import checkpoint
  from omniopd_jax.train import step as train_step

  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: --workdir must be a training workdir")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  student_dir = config.model.student_path or os.path.join(workdir, "models", "student")
  # The checkpoint's parameter layout: stacked [L, ...] when the run scanned its layers.
  model, tokenizer = hf.load_pretrained(
    student_dir, config.model.dtype, config.model.param_dtype,
    scan_layers=config.model.get("scan_layers", False),
  )  # fmt: skip
  if config.model.tokenizer_path:
    tokenizer = hf.load_tokenizer(config.model.tokenizer_path)
  graphdef, params = nnx.split(model)
  tx = train_step.make_optimizer(config.optimizer, config.num_steps)
  abstract = jax.eval_shape(lambda: train_step.init_state(params, tx, 0))
  ckpt = checkpoint.Checkpointer(workdir, every=0, keep=10**6, use_async=False)
  try:
    state, _ = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  model = nnx.merge(graphdef, state.params)
  hf.save_pretrained(
    model, tokenizer, out, dtype=dtype, generation_config=_generation_config(student_dir)
  )
  return int(state.step)


def _generation_config(model_dir: str) -> dict:
  """The student base's own generation settings (sampling defaults, stop ids), if it has any."""
  path = os.path.join(model_dir, "generation_config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  step = export(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.dtype)
  print(f"exported step {step} of {FLAGS.workdir} to {FLAGS.out}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
