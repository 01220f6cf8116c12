"""OpenAI-compatible completions server (vLLM's wire conventions) for any checkpoint our model family
loads; concurrent requests are batched into sampler calls. Also runs it in a subprocess or thread.

  python -m omniopd_jax.serve --model DIR [--host 127.0.0.1] [--port 8000] [--max_batch 64]
  with serve.start_subprocess(DIR) as server: ...   # server.url = "http://127.0.0.1:PORT/v1"
"""

import argparse
import asyncio
import atexit
import collections
import concurrent.futures
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import jax
from aiohttp import web

from omniopd_jax.teacher import local as teacher_local

BATCH_WAIT_S = 0.005  # how long a request waits for others to share its sampler call
DEFAULT_MAX_TOKENS = 16  # vLLM's default for /v1/completions
_READY = re.compile(r"ready at (http://\S+)")


class BadRequest(teacher_local.RequestError):
  """An invalid request: answered with HTTP 400 and an OpenAI-style error body."""


# ---------------------------------------------------------------------------- request parsing


def _field(body, name, kinds, default, check=None, what=""):
  value = body.get(name, default)
  if value is None:
    return default
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
  if not ok or (check is not None and not check(value)):
    raise BadRequest(f"`{name}` must be {what}; got {value!r}", name)
  return value


def parse_prompts(prompt, teacher, add_special_tokens: bool):
  """(token-id prompts, echo texts) from a str, list of str, list of ids or list of id lists."""
  is_ids = lambda x: (
    isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
  )
  if isinstance(prompt, str):
    prompt = [prompt]
  if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
    ids = tuple(teacher.tokenize(p, add_special_tokens) for p in prompt)
    return ids, tuple(prompt)
  if isinstance(prompt, list) and prompt and is_ids(prompt):
    return (tuple(prompt),), None
  if isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
    return tuple(tuple(p) for p in prompt), None
  raise BadRequest(
    "`prompt` must be a string, a list of strings, a list of token ids or a list of token-id "
    f"lists (non-empty); got {str(prompt)[:80]!r}",
    "prompt",
  )


def parse_request(body, teacher, *, max_tokens_cap: int) -> tuple[teacher_local.Job, dict]:
  """A /v1/completions JSON body -> (Job, options for the response). Raises BadRequest."""
  if not isinstance(body, dict):
    raise BadRequest("the request body must be a JSON object", None)
  if "prompt" not in body:
    raise BadRequest("`prompt` is required", "prompt")
  for name in ("stream", "suffix", "logit_bias"):
    if body.get(name):
      raise BadRequest(f"`{name}` is not supported by this server; leave it unset", name)
  best_of = body.get("best_of")
  if best_of is not None and best_of != body.get("n", 1):
    raise BadRequest("`best_of` is not supported by this server; leave it unset", "best_of")
  n = _field(body, "n", int, 1, lambda v: v >= 1, "a positive integer")
  default_max = min(DEFAULT_MAX_TOKENS, max_tokens_cap)
  max_tokens = _field(body, "max_tokens", int, default_max, lambda v: v >= 0, "an integer >= 0")
  if max_tokens > max_tokens_cap:
    raise BadRequest(
      f"`max_tokens`={max_tokens} is above this server's cap of {max_tokens_cap} (the smaller of "
      "--max_tokens_cap and the model's context length); ask for fewer tokens",
      "max_tokens",
    )
  number = (int, float)
  temperature = _field(body, "temperature", number, 1.0, lambda v: v >= 0, "a number >= 0")
  top_p = _field(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
  top_k = _field(body, "top_k", int, 0, lambda v: v >= -1, "an integer >= -1 (-1 or 0: off)")
  seed = _field(body, "seed", int, None, None, "an integer")
  limit = teacher_local.MAX_LOGPROBS
  logprobs = _field(
    body, "logprobs", int, None, lambda v: 0 <= v <= limit, f"an integer in [0, {limit}]"
  )
  flags = {
    name: _field(body, name, bool, default, None, "true or false")
    for name, default in (
      ("echo", False),
      ("ignore_eos", False),
      ("include_stop_str_in_output", False),
      ("add_special_tokens", True),
      ("return_token_ids", False),
    )
  }
  stop = body.get("stop")
  stop = [stop] if isinstance(stop, str) else stop or []
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
    raise BadRequest("`stop` must be a non-empty string or a list of them", "stop")
  prompts, texts = parse_prompts(body["prompt"], teacher, flags["add_special_tokens"])
  params = teacher_local.SamplingParams(
    max_tokens=max_tokens,
    n=n,
    temperature=float(temperature),
    top_p=float(top_p),
    top_k=max(top_k, 0),
    seed=seed,
    stop=tuple(stop),
    logprobs=logprobs,
    echo=flags["echo"],
    ignore_eos=flags["ignore_eos"],
    include_stop_str_in_output=flags["include_stop_str_in_output"],
  )
  job = teacher_local.Job(prompts, params, texts)
  try:
    teacher.check(job)
  except teacher_local.RequestError as e:
    raise BadRequest(e.message, e.param, e.code) from None
  return job, {"return_token_ids": flags["return_token_ids"]}


def completion_response(job, choices, model_name: str, return_token_ids: bool) -> dict:
  """The /v1/completions answer: choice index = prompt index * n + sample index; usage counts
  each prompt once and every choice's generated tokens."""
  n = job.params.n
  out = []
  for index, c in enumerate(choices):
    choice = {
      "index": index,
      "text": c.text,
      "logprobs": c.logprobs,
      "finish_reason": c.finish_reason,
      "stop_reason": c.stop_reason,
    }
    if return_token_ids:
      choice["token_ids"] = c.token_ids
      choice["prompt_token_ids"] = list(job.prompts[index // n])
    out.append(choice)
  prompt_tokens = sum(len(p) for p in job.prompts)
  completion_tokens = sum(len(c.token_ids) for c in choices)
  return {
    "id": f"cmpl-{uuid.uuid4().hex}",
    "object": "text_completion",
    "created": int(time.time()),
    "model": model_name,
    "choices": out,
    "usage": {
      "prompt_tokens": prompt_tokens,
      "completion_tokens": completion_tokens,
      "total_tokens": prompt_tokens + completion_tokens,
    },
  }


def error_body(status: int, message: str, param=None, code=None) -> dict:
  kind = "invalid_request_error" if status < 500 else "internal_server_error"
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def handle_completion(body, teacher, batcher, max_tokens_cap=None) -> tuple[int, dict]:
  """(HTTP status, JSON body) answering one /v1/completions body (shared by the HTTP route and
  the in-process `local` backend)."""
  cap = min(max_tokens_cap or teacher.max_model_len, teacher.max_model_len)
  try:
    job, opts = parse_request(body, teacher, max_tokens_cap=cap)
  except BadRequest as e:
    return 400, error_body(400, e.message, e.param, e.code)
  try:
    choices = await batcher.submit(job)
  except Exception as e:  # noqa: BLE001  (reported to the caller, who may retry a 500)
    return 500, error_body(500, f"generation failed: {e!r}")
  return 200, completion_response(job, choices, teacher.name, **opts)


# ---------------------------------------------------------------------------------- batching


class Batcher:
  """Gathers concurrent jobs (arrivals within `wait_s`, up to `max_batch` rows) into one
  `teacher.run` on a single worker thread, so JAX work never blocks the event loop and runs one
  batch at a time. The gathering task lives only while jobs are pending."""

  def __init__(self, teacher, max_batch: int, wait_s: float = BATCH_WAIT_S):
    self.teacher, self.max_batch, self.wait_s = teacher, max_batch, wait_s
    self._pending: collections.deque = collections.deque()  # (job, future)
    self._task: asyncio.Task | None = None
    self._work: queue.Queue = queue.Queue()
    # A daemon thread (not an executor) so that shutdown never waits on a running batch.
    threading.Thread(target=self._worker, name="serve-jax", daemon=True).start()

  async def submit(self, job):
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    self._pending.append((job, future))
    if self._task is None or self._task.done():
      self._task = loop.create_task(self._gather())
    result = await future
    if isinstance(result, Exception):
      raise result
    return result

  def close(self):
    """Stops the worker thread (callable from any thread, also after the loop stopped)."""
    self._work.put(None)
    task, self._task = self._task, None
    if task is not None and not task.done() and not task.get_loop().is_closed():
      task.get_loop().call_soon_threadsafe(task.cancel)

  def _worker(self):
    while (item := self._work.get()) is not None:
      fn, args, done = item
      try:
        done.set_result(fn(*args))
      except BaseException as e:  # noqa: BLE001
        done.set_exception(e)

  async def _gather(self):
    while self._pending:
      if sum(job.rows for job, _ in self._pending) < self.max_batch:
        await asyncio.sleep(self.wait_s)  # let concurrent requests join this batch
      items, rows = [], 0
      while self._pending and (not items or rows + self._pending[0][0].rows <= self.max_batch):
        items.append(self._pending.popleft())
        rows += items[-1][0].rows
      done = concurrent.futures.Future()
      self._work.put((self.teacher.run, ([job for job, _ in items],), done))
      try:
        results = await asyncio.wrap_future(done)
      except Exception as e:  # noqa: BLE001
        results = [e] * len(items)
      for (_, future), result in zip(items, results):
        if not future.done():  # the client may have gone away
          future.set_result(result)


# ------------------------------------------------------------------------------------ the app


def make_app(teacher, *, max_batch: int = 64, max_tokens_cap: int | None = None) -> web.Application:
  """The aiohttp app: POST /v1/completions, GET /v1/models, GET /health."""
  app = web.Application(client_max_size=64 * 2**20)
  state = {}

  async def on_startup(app):
    state["batcher"] = Batcher(teacher, max_batch)

  async def on_cleanup(app):
    state["batcher"].close()

  async def completions(request):
    try:
      body = await request.json()
    except ValueError as e:
      status, out = 400, error_body(400, f"the request body is not valid JSON: {e}")
    else:
      status, out = await handle_completion(body, teacher, state["batcher"], max_tokens_cap)
    return web.json_response(out, status=status)

  async def models(request):
    card = {
      "id": teacher.name,
      "object": "model",
      "created": int(time.time()),
      "owned_by": "omniopd_jax",
      "max_model_len": teacher.max_model_len,
    }
    return web.json_response({"object": "list", "data": [card]})

  async def health(request):
    return web.Response(status=200)

  app.on_startup.append(on_startup)
  app.on_cleanup.append(on_cleanup)
  app.router.add_post("/v1/completions", completions)
  app.router.add_get("/v1/models", models)
  app.router.add_get("/health", health)
  return app


async def _start(app, host: str, port: int) -> tuple[web.AppRunner, int]:
  runner = web.AppRunner(app, shutdown_timeout=5.0)
  await runner.setup()
  site = web.TCPSite(runner, host, port)
  await site.start()
  return runner, site._server.sockets[0].getsockname()[1]


def _url(host: str, port: int) -> str:
  return f"http://{host}:{port}/v1"


class ServerThread:
  """Serves a LocalTeacher from a daemon thread's event loop (the in-process `local` backend)."""

  def __init__(self, teacher, *, host: str = "127.0.0.1", port: int = 0, **app_kwargs):
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, name="serve", daemon=True)
    self._thread.start()
    app = make_app(teacher, **app_kwargs)
    start = asyncio.run_coroutine_threadsafe(_start(app, host, port), self._loop)
    self._runner, self.port = start.result(60)
    self.url = _url(host, self.port)

  def close(self) -> None:
    if self._thread.is_alive():
      asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
      self._loop.call_soon_threadsafe(self._loop.stop)
      self._thread.join(30)


async def serve(teacher, host: str, port: int, parent_pid: int | None = None, **app_kwargs):
  """Runs until SIGTERM/SIGINT (or until `parent_pid` dies), then shuts down cleanly."""
  loop = asyncio.get_running_loop()
  stop = asyncio.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  runner, port = await _start(make_app(teacher, **app_kwargs), host, port)
  device = jax.devices()[0].platform
  print(
    f"omniopd_jax.serve: ready at {_url(host, port)} (model {teacher.name}, {device})", flush=True
  )
  while not stop.is_set():
    try:
      await asyncio.wait_for(stop.wait(), 0.5)
    except TimeoutError:
      if parent_pid and os.getppid() != parent_pid:  # orphaned: the parent died without stop()
        print("omniopd_jax.serve: parent process gone; stopping", flush=True)
        break
  await runner.cleanup()
  print("omniopd_jax.serve: stopped", flush=True)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m omniopd_jax.serve", description=__doc__)
  p.add_argument(
    "--model", required=True, help="HF model directory (config, safetensors, tokenizer)"
  )
  p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the server)")
  p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
  p.add_argument("--max_batch", type=int, default=64, help="rows per sampler call")
  p.add_argument("--max_tokens_cap", type=int, default=None, help="largest max_tokens accepted")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--served_model_name", default=None, help="the model id (default: dir name)")
  p.add_argument("--exit_with_parent", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  teacher = teacher_local.LocalTeacher.from_pretrained(
    args.model, dtype=args.dtype, name=args.served_model_name, max_batch=args.max_batch
  )
  kwargs = dict(max_batch=args.max_batch, max_tokens_cap=args.max_tokens_cap)
  asyncio.run(serve(teacher, args.host, args.port, args.exit_with_parent, **kwargs))
  # Shut down: the server is closed and nothing is left to flush; skipping the interpreter's
  # teardown (torch, imported by transformers, alone takes seconds) makes stop() quick.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


# --------------------------------------------------------------------------- subprocess handle


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
  (`max_batch=8` -> `--max_batch 8`). Output goes to `log_path` (default: a temporary file).
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
      found = _READY.search(f.read())
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


if __name__ == "__main__":
  main()
