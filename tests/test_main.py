"""End to end: `python -m omniopd_jax.main --config=configs/math.py:smoke` with every real part
(our teacher server over HTTP, the real MiniLM embedding scorer, Orbax checkpoints), SIGKILL between
checkpoints then resume with exactly the parameters of an uninterrupted run, and bad configs."""

import json
import os
import pathlib
import re
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


def start(cmd):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    start_new_session=True,
  )  # fmt: skip


def read_until(proc, done, timeout=600) -> list[str]:
  """The run's output lines up to and including the first for which done(line) holds."""
  deadline, seen = time.monotonic() + timeout, []
  for line in proc.stdout:
    seen.append(line)
    if done(line) or time.monotonic() > deadline:
      return seen
  return seen


def kill_hard(proc):
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()


def poll_until(proc, condition, interval=0.002, timeout=600) -> bool:
  """Polls condition() until it holds (True) or the process exits (False)."""
  deadline = time.monotonic() + timeout
  while proc.poll() is None and time.monotonic() < deadline:
    if condition():
      return True
    time.sleep(interval)
  return False


def checkpoints(workdir) -> list[str]:
  path = workdir / "checkpoints"
  return sorted(os.listdir(path)) if path.exists() else []


def teacher_server_pid(trainer_pid: int) -> int:
  """The pid of the teacher server the :smoke run started (teacher.serve_local)."""
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      cmd = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
    except OSError:
      continue
    if b"omniopd_jax.serve" in cmd and str(trainer_pid).encode() in cmd:
      return int(entry)
  raise AssertionError(f"no teacher server started by {trainer_pid}")


@pytest.mark.slow
def test_kills_at_many_points_then_resume_match_uninterrupted(uninterrupted, tmp_path):
  """SIGKILL right after checkpoint 2 lands (step 3's rollout running), after step 3 (its teacher
  answers cached, no checkpoint), and in the middle of writing checkpoint 4; each time the rerun
  resumes, and the final parameters equal an uninterrupted run's bit for bit."""
  full_dir, _ = uninterrupted
  workdir = tmp_path / "killed"
  # 1. Right after a checkpoint: the moment checkpoints/2 is complete (mid-rollout of step 3).
  proc = start(main_cmd(workdir))
  assert poll_until(proc, lambda: "2" in checkpoints(workdir)), proc.stdout.read()[-3000:]
  kill_hard(proc)
  assert checkpoints(workdir) == ["2"]
  # 2. After step 3's teacher answers are cached, before its checkpoint (4).
  proc = start(main_cmd(workdir))
  seen = read_until(proc, lambda line: line.startswith("step 3/4"))
  kill_hard(proc)
  assert any("resumed from step 2" in line for line in seen), "".join(seen)[-3000:]
  assert any(line.startswith("step 3/4") for line in seen), "".join(seen)[-3000:]
  assert checkpoints(workdir) == ["2"]
  # 3. In the middle of writing checkpoint 4 (Orbax's temporary directory exists).
  proc = start(main_cmd(workdir))
  writing = lambda: any(n.startswith("4") and "tmp" in n for n in checkpoints(workdir))  # noqa: E731
  caught = poll_until(proc, writing)
  kill_hard(proc)
  assert caught, "the run ended before checkpoint 4 was being written"
  assert "4" not in checkpoints(workdir)  # a half-written checkpoint is never picked up
  # 4. The rerun resumes from 2 and finishes.
  stdout = run(main_cmd(workdir))
  assert "resumed from step 2" in stdout
  a = export(full_dir, tmp_path / "a")
  b = export(workdir, tmp_path / "b")
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_teacher_killed_mid_run_stops_with_a_checkpoint_and_resumes(tmp_path):
  """The teacher server dies after step 2: the run checkpoints its last trained step, exits
  non-zero naming the cause and the resume command, and the rerun (with a new teacher) resumes
  and finishes."""
  workdir = tmp_path / "run"
  cmd = main_cmd(workdir, "--config.scoring.phi=edit", "--config.checkpoint_every=100",
                 "--config.num_steps=6", "--config.teacher.max_retries=1")  # fmt: skip
  proc = start(cmd)
  seen = read_until(proc, lambda line: line.startswith("step 2/6"))
  assert any(line.startswith("step 2/6") for line in seen), "".join(seen)[-3000:]
  os.kill(teacher_server_pid(proc.pid), signal.SIGKILL)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 1, out[-3000:]
  stopped = re.search(r"Step (\d+) was not trained", out)
  assert "training stopped without its teacher" in out and stopped, out[-3000:]
  stopped = int(stopped.group(1))  # 3, or 4 when step 3's teacher answered before the kill
  assert "resume with:" in out and "omniopd_jax.main" in out, out[-3000:]
  assert f"step {stopped}/6" not in out and "eval after training" not in out
  assert checkpoints(workdir) == [str(stopped - 1)]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  trained = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in trained] == list(range(1, stopped))
  for r in trained:  # the tolerated failures, reported per step
    assert r["omniopd/teacher_failed_frac"] == pytest.approx(
      r["omniopd/teacher_failures"] / (r["omniopd/forks_sent"] * 3)
    )
  stdout = run(cmd)
  assert f"resumed from step {stopped - 1}" in stdout and "step 6/6" in stdout


def test_sigterm_during_a_failing_teacher_exits_within_seconds(tmp_path):
  """SIGTERM while the step waits on a teacher that keeps failing (retrying with backoff): the
  wait is cancelled, the last complete step checkpointed, and the process exits in < 30 s."""
  workdir = tmp_path / "run"
  cmd = main_cmd(workdir, "--config.scoring.phi=edit", "--config.checkpoint_every=100",
                 "--config.num_steps=8")  # fmt: skip
  proc = start(cmd)
  seen = read_until(proc, lambda line: line.startswith("step 1/8"))
  assert any(line.startswith("step 1/8") for line in seen), "".join(seen)[-3000:]
  os.kill(teacher_server_pid(proc.pid), signal.SIGKILL)  # every request now retries for ~20 s
  time.sleep(3)  # step 2's rollout is done; its teacher wait has begun
  t0 = time.monotonic()
  os.kill(proc.pid, signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  elapsed = time.monotonic() - t0
  assert elapsed < 30, (elapsed, out[-3000:])
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert "SIGTERM" in out and "resume with:" in out, out[-3000:]
  last = max(int(n) for n in checkpoints(workdir))
  assert last >= 1 and "step 8/8" not in out


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


def test_setup_picks_models_from_config_fields_not_variant_names(tmp_path):
  from omniopd_jax.configs import math as math_config
  from omniopd_jax.train import setup

  config = math_config.get_config()  # variant "default"
  config.model.build_demo_models = "tiny"
  student, teacher = setup.resolve_models(config, str(tmp_path))
  assert student == str(tmp_path / "models" / "student")
  assert teacher == str(tmp_path / "models" / "teacher")
  assert os.path.exists(os.path.join(teacher, "config.json"))
  config.model.build_demo_models = ""
  with pytest.raises(ValueError, match="student_path is empty"):
    setup.resolve_models(config, str(tmp_path))
  smoke = math_config.get_config("smoke")
  smoke.model.build_demo_models = "nonsense"
  with pytest.raises(ValueError, match="build_demo_models"):
    setup.resolve_models(smoke, str(tmp_path / "other"))
