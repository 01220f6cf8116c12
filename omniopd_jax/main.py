"""Entry point: `python -m omniopd_jax.main --config=configs/math.py[:variant] --workdir=DIR`.

OmniOPD: the student samples its own answers; at its highest-entropy forks a black-box teacher
writes Monte Carlo continuations from the exact prefix; the student's chunk is scored against them
(semantic similarity), smoothed by a Dirichlet prior centred on the student's own belief, and
reinforced, while a KL anchor to the frozen base holds every unaudited token in place.

Multi-host: pass --coordinator_address/--num_processes/--process_id, or run on a TPU pod or under
SLURM (detected), and `jax.distributed.initialize` is called before anything touches devices.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from omniopd_jax.configs import validate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/math.py:smoke.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here (auto-resume).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed():
  """Start JAX's multi-controller runtime when asked to, or on a detected pod / SLURM job."""
  import jax

  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES"):
    jax.distributed.initialize()  # cluster auto-detection (SLURM, Cloud TPU)


def main(argv):
  del argv
  validate.validate_or_exit(FLAGS.config)  # before any device, model or teacher work
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  maybe_initialize_distributed()
  import jax

  from omniopd_jax.train import loop as train

  train.setup_logging()
  print(
    f"omniopd_jax: process {jax.process_index()}/{jax.process_count()}, "
    f"{jax.local_device_count()} local / {jax.device_count()} devices ({jax.devices()[0].platform}), "
    f"method={FLAGS.config.method}, workdir={FLAGS.workdir}",
    flush=True,
  )
  try:
    train.run(FLAGS.config, FLAGS.workdir)
  except train.StopTraining as stop:
    print(f"omniopd_jax: {stop.reason}", file=sys.stderr, flush=True)
    sys.exit(stop.exit_code)


if __name__ == "__main__":
  app.run(main)
