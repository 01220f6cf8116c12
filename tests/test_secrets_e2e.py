"""End to end: a training run whose teacher gateway echoes the API key in its error bodies leaves
the key nowhere: not in any file of the workdir, not on stdout, not on stderr."""

import os
import pathlib
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import fake_teacher_servers as fts  # noqa: E402

ROOT = pathlib.Path(__file__).parents[1]
KEY = "sk-live-e2e-0123456789abcdef"


def test_a_key_echoing_gateway_leaks_nothing_into_the_workdir_or_the_logs(tmp_path):
  teacher = fts.FakeTeacher(api_key=KEY, echo_key=True, fault_rate=0.5, seed=3)
  workdir = tmp_path / "run"
  with fts.ServerThread(teacher) as server:
    cmd = [
      sys.executable, "-m", "omniopd_jax.main", f"--workdir={workdir}",
      "--config=configs/math.py:smoke", "--config.scoring.phi=edit", "--config.num_steps=2",
      f"--config.teacher.base_url={server.url('/v1')}", "--config.teacher.serve_local=False",
      "--config.teacher.api_key_env=E2E_TEACHER_KEY", "--config.teacher.max_retries=1",
      "--config.teacher.max_failed_fraction=1.0", "--config.teacher.timeout_s=10",
    ]  # fmt: skip
    env = dict(os.environ, E2E_TEACHER_KEY=KEY, PYTHONUNBUFFERED="1")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  echoed = [r for r in teacher.log if r["fault"]]
  assert echoed, "the gateway never failed: the test would prove nothing"
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "you sent" in (workdir / "samples.jsonl").read_text()  # the echo reached our outputs...
  assert KEY not in out.stdout and KEY not in out.stderr  # ...without the key
  leaks = [p for p in workdir.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
  assert not leaks, leaks
