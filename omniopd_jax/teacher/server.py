"""The HTTP shell of the local engine: an OpenAI-compatible server (vLLM's wire conventions) for any
checkpoint our model family loads. Routes only; parsing is `protocol`, batching `batcher`.

  python -m omniopd_jax.serve --model DIR [--host 127.0.0.1] [--port 8000] [--max_batch 64]
  with serve.start_subprocess(DIR) as server: ...   # server.url = "http://127.0.0.1:PORT/v1"
"""

import argparse
import asyncio
import os
import signal
import sys
import threading
import time

import jax
from aiohttp import web

from omniopd_jax.teacher import engine
from omniopd_jax.teacher.batcher import Batcher
from omniopd_jax.teacher.launch import ServerHandle, start_subprocess
from omniopd_jax.teacher.protocol import error_body, handle_completion

__all__ = ["Batcher", "ServerHandle", "ServerThread", "handle_completion", "main", "make_app",
           "serve", "start_subprocess"]  # fmt: skip


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
  teacher = engine.LocalTeacher.from_pretrained(
    args.model, dtype=args.dtype, name=args.served_model_name, max_batch=args.max_batch
  )
  kwargs = dict(max_batch=args.max_batch, max_tokens_cap=args.max_tokens_cap)
  asyncio.run(serve(teacher, args.host, args.port, args.exit_with_parent, **kwargs))
  # Shut down: the server is closed and nothing is left to flush; skipping the interpreter's
  # teardown (torch, imported by transformers, alone takes seconds) makes stop() quick.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)
