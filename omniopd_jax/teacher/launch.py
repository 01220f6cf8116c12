"""Runs `python -m omniopd_jax.serve` as a subprocess (its own process group) and waits until ready.

with launch.start_subprocess(DIR) as server: ...   # server.url = "http://127.0.0.1:PORT/v1"
"""

import atexit
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

CLIENT_DEFAULT_MODEL = "teacher"  # TeacherClient's default `model` (config teacher.model)
READY = re.compile(r"ready at (http://\S+)")  # the line `serve` prints once it listens


class ServerHandle:
  """A `serve` subprocess (its own process group). `.url` is the OpenAI base URL (…/v1).
  Stopped by `stop()`, on leaving a `with` block, and at interpreter exit (Ctrl-C included)."""

  def __init__(self, proc: subprocess.Popen, url: str, log_path: str):
    self.proc, self.url, self.log_path = proc, url, log_path
    self.root = url.removesuffix("/v1")
    atexit.register(self.stop)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()

  def stop(self, timeout: float = 15.0) -> int | None:
    """SIGTERM to the server's process group, SIGKILL after `timeout`; returns the exit code."""
    atexit.unregister(self.stop)
    if self.proc.poll() is None:
      _signal_group(self.proc, signal.SIGTERM)
      try:
        self.proc.wait(timeout)
      except subprocess.TimeoutExpired:
        _signal_group(self.proc, signal.SIGKILL)
        self.proc.wait()
    return self.proc.returncode

  def log_tail(self, chars: int = 4000) -> str:
    with open(self.log_path, errors="replace") as f:
      return f.read()[-chars:]


def _signal_group(proc, sig) -> None:
  try:
    os.killpg(proc.pid, sig)
  except ProcessLookupError:
    pass


def start_subprocess(
  model_dir: str,
  *,
  port: int = 0,
  host: str = "127.0.0.1",
  log_path: str | None = None,
  timeout_s: float = 300.0,
  env: dict | None = None,
  **flags,
) -> ServerHandle:
  """Starts `python -m omniopd_jax.serve --model model_dir` and waits until /health answers.

  `port=0` lets the server pick a free port. Other keyword flags become command-line flags
  (`max_batch=8` -> `--max_batch 8`); without `served_model_name` the server answers to the
  directory's name and to "teacher" (TeacherClient's default model name). Output goes to
  `log_path` (default: a temporary file).
  The child inherits `env` (default: os.environ) with XLA_PYTHON_CLIENT_PREALLOCATE=false unless
  set; on a TPU host, which one process owns, pass env with JAX_PLATFORMS=cpu for a CPU teacher.
  Raises RuntimeError, with the log's tail, when the server exits or is not ready in `timeout_s`.
  """
  if not os.path.exists(os.path.join(model_dir, "config.json")):
    raise FileNotFoundError(
      f"{model_dir} has no config.json: serve needs an HF model directory (config.json, "
      "safetensors, tokenizer files)"
    )
  if log_path is None:
    fd, log_path = tempfile.mkstemp(prefix="omniopd_serve_", suffix=".log")
    os.close(fd)
  if flags.get("served_model_name") is None:
    # The directory's name, and the model name TeacherClient sends by default (teacher.model):
    # the server answers 404 to any other.
    base = os.path.basename(os.path.normpath(model_dir))
    flags["served_model_name"] = f"{base},{CLIENT_DEFAULT_MODEL}"
  cmd = [sys.executable, "-m", "omniopd_jax.serve", "--model", model_dir]
  cmd += ["--host", host, "--port", str(port), "--exit_with_parent", str(os.getpid())]
  for name, value in flags.items():
    if value is not None:
      cmd += [f"--{name}", str(value)]
  env = dict(os.environ if env is None else env)
  # A sidecar teacher must not grab most of a GPU the trainer shares (JAX preallocates 75%).
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
  with open(log_path, "ab") as log:
    offset = log.tell()  # an appended log may hold an older run's ready line
    proc = subprocess.Popen(
      cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
  handle = ServerHandle(proc, "", log_path)
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    with open(log_path, errors="replace") as f:
      f.seek(offset)
      found = READY.search(f.read())
    if found and _healthy(found.group(1).removesuffix("/v1")):
      handle.url, handle.root = found.group(1), found.group(1).removesuffix("/v1")
      return handle
    if proc.poll() is not None:
      break
    time.sleep(0.1)
  code = handle.stop()
  why = f"exited with code {code}" if code not in (None, 0, -signal.SIGTERM) else "was not ready"
  raise RuntimeError(
    f"omniopd_jax.serve for {model_dir} {why} (after {timeout_s:.0f} s at most); "
    f"log {log_path}:\n{handle.log_tail()}"
  )


def _healthy(root: str) -> bool:
  try:
    with urllib.request.urlopen(root + "/health", timeout=2) as resp:
      return resp.status == 200
  except OSError:
    return False
