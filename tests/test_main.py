"""End to end: `python -m omniopd_jax.main --config=configs/math.py:smoke` with every real part
(our teacher server over HTTP, the real MiniLM embedding scorer, Orbax checkpoints), SIGKILL between
checkpoints then resume with exactly the parameters of an uninterrupted run, and bad configs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).parents[1]
SMOKE = [
  "--config=configs/math.py:smoke",
  "--config.scoring.phi=embedding",  # the real all-MiniLM-L6-v2 (sentence-transformers)
  "--config.scoring.embedding_backend=sentence_transformers",
  "--config.num_steps=4",
  "--config.checkpoint_every=2",
  "--config.data.eval_size=8",
  "--config.eval.num_examples=8",
]


def main_cmd(workdir, *extra):
  return [sys.executable, "-m", "omniopd_jax.main", f"--workdir={workdir}", *SMOKE, *extra]


def run(cmd, timeout=600):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
  assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
  return out.stdout


def export(workdir, out):
  run([sys.executable, "-m", "omniopd_jax.tools.export", f"--workdir={workdir}", f"--out={out}"])
  return load_file(os.path.join(out, "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  stdout = run(main_cmd(workdir))
  return workdir, stdout


def test_smoke_trains_end_to_end(uninterrupted):
  workdir, stdout = uninterrupted
  assert "teacher: serving" in stdout and "step 4/4" in stdout
  assert "eval before training" in stdout and "eval after training" in stdout
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
  last = [r for r in rows if "train/loss" in r][-1]
  # The teacher answered over HTTP and the chunks were scored and audited.
  assert last["teacher/requests"] > 0 and last["omniopd/forks_sent"] > 0
  assert 0.0 < last["omniopd/pi_hat_mean"] < 1.0
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  samples = [json.loads(line) for line in open(workdir / "samples.jsonl")]
  assert any(s.get("teacher_chunks") for s in samples)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert any(name.startswith("events") for name in os.listdir(workdir / "tb"))
  config = json.load(open(workdir / "config.json"))
  assert config["method"] == "omniopd" and config["omniopd"]["num_forks"] == 2


def test_sigkill_then_resume_matches_uninterrupted(uninterrupted, tmp_path):
  full_dir, _ = uninterrupted
  workdir = tmp_path / "killed"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(
    main_cmd(workdir), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    text=True, start_new_session=True,
  )  # fmt: skip
  # Kill hard once step 3 has been logged: checkpoint 2 is complete, checkpoint 4 not yet written.
  deadline, seen = time.monotonic() + 600, []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith("step 3/4") or time.monotonic() > deadline:
      break
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert any(line.startswith("step 3/4") for line in seen), "".join(seen)[-3000:]
  assert "4" not in os.listdir(workdir / "checkpoints")

  stdout = run(main_cmd(workdir))
  assert "resumed from step 2" in stdout
  a = export(full_dir, tmp_path / "a")
  b = export(workdir, tmp_path / "b")
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize(
  "flag,message",
  [
    ("--config.omniopd.num_frks=3", "num_frks"),
    ("--config.model.student_path=/nonexistent/model", "config.json"),
  ],
)
def test_bad_config_fails_clearly(flag, message, tmp_path):
  cmd = [
    sys.executable, "-m", "omniopd_jax.main", "--config=configs/math.py",
    f"--workdir={tmp_path}", flag,
  ]  # fmt: skip
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert message in out.stderr + out.stdout
