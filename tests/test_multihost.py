"""Multi-host for real: two JAX processes on 127.0.0.1 with 4 CPU devices each train `:smoke` and end
with the parameters of one process with 8 devices (same seeds), compared through tools.export."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).parents[1]
ARGS = [
  "--config=configs/math.py:smoke",
  "--config.num_steps=3",
  "--config.optimizer.learning_rate=1e-3",
  "--config.checkpoint_every=3",
  "--config.rollout.temperature=0.0",  # greedy: rows may sit at other batch positions per layout
  "--config.omniopd.weight_form=centered",  # centred over the global batch, on device
  "--config.teacher.prompts_per_request=1",  # teacher seeds from the fork alone, not its packing
  "--config.data.eval_size=4",
  "--config.eval.num_examples=4",
]


def env_with(devices: int) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def export(workdir, out) -> dict:
  cmd = [sys.executable, "-m", "omniopd_jax.tools.export", f"--workdir={workdir}", f"--out={out}"]
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300, env=env_with(1))
  return load_file(os.path.join(out, "model.safetensors"))


def test_two_processes_match_one(tmp_path):
  single = tmp_path / "single"
  cmd = [sys.executable, "-m", "omniopd_jax.main", f"--workdir={single}", *ARGS]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env_with(8))
  assert out.returncode == 0, out.stderr[-4000:]

  multi, port = tmp_path / "multi", free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "omniopd_jax.main",
        f"--workdir={multi}",
        *ARGS,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=ROOT,
      env=env_with(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )  # fmt: skip
    for i in range(2)
  ]
  logs = [p.communicate(timeout=900)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  assert "process 0/2" in logs[0] and "process 1/2" in logs[1]
  assert "step 3/3" in logs[0] and "step 3/3" not in logs[1]  # only process 0 reports

  a, b = export(single, tmp_path / "a"), export(multi, tmp_path / "b")
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
