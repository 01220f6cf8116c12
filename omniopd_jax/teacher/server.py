"""The HTTP shell of the local engine: an OpenAI-compatible server (vLLM's wire conventions) for any
checkpoint our model family loads. Routes only; parsing is `protocol`, batching `batcher`.

  python -m omniopd_jax.serve --model DIR [--host 127.0.0.1] [--port 8000] [--max_batch 64]
  with serve.start_subprocess(DIR) as server: ...   # server.url = "http://127.0.0.1:PORT/v1"
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time

import jax
from aiohttp import web

from omniopd_jax.teacher import engine
from omniopd_jax.teacher.batcher import Batcher
from omniopd_jax.teacher.chat import handle_chat
from omniopd_jax.teacher.launch import ServerHandle, start_subprocess
from omniopd_jax.teacher.protocol import Limits, error_body, handle_completion

__all__ = ["Batcher", "ServerHandle", "ServerThread", "handle_completion", "main", "make_app",
           "serve", "start_subprocess"]  # fmt: skip


BODY_PARSE_OFF_LOOP = 1 << 18  # bytes: larger JSON bodies are parsed on a worker thread


@web.middleware
async def json_errors(request, handler):
  """OpenAI-style JSON bodies on every error route (404, 405, 413, 500), not aiohttp's text."""
  try:
    return await handler(request)
  except web.HTTPException as e:
    if e.status < 400 or e.content_type == "application/json":
      raise
    headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
    message = f"{e.reason}: {request.method} {request.path}"
    if e.status == 413:
      message = f"{e.reason}: the request body is above this server's limit"
    return web.json_response(error_body(e.status, message), status=e.status, headers=headers)
  except Exception as e:  # noqa: BLE001  (a bug answers a JSON 500, never a hung or text one)
    return web.json_response(error_body(500, f"internal error: {e!r}"), status=500)


async def read_json(request):
  """The parsed body, or a 400 answer for bodies that are not JSON (or nest too deep to parse)."""
  raw = await request.read()
  try:
    text = raw.decode("utf-8")
    if len(raw) > BODY_PARSE_OFF_LOOP:  # a big body must not stall the loop (and /health)
      return await asyncio.to_thread(json.loads, text), None
    return json.loads(text), None
  except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
    reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
    return None, web.json_response(
      error_body(400, f"the request body is not valid JSON: {reason}"), status=400
    )


def make_app(
  teacher, *, max_batch: int = 64, limits: Limits | None = None, max_body_mb: float = 64
) -> web.Application:
  """The aiohttp app: POST /v1/completions and /v1/chat/completions, GET /v1/models, /health."""
  limits = limits or Limits(served_names=(teacher.name,))
  app = web.Application(client_max_size=int(max_body_mb * 2**20), middlewares=[json_errors])
  state = {}

  async def on_startup(app):
    state["batcher"] = Batcher(teacher, max_batch)

  async def on_cleanup(app):
    state["batcher"].close()

  def route(handle):
    async def answer(request):
      body, bad = await read_json(request)
      if bad is not None:
        return bad
      status, out = await handle(body, teacher, state["batcher"], limits)
      return web.json_response(out, status=status)

    return answer

  async def models(request):
    cards = [
      {"id": name, "object": "model", "created": int(time.time()), "owned_by": "omniopd_jax",
       "max_model_len": teacher.max_model_len}
      for name in limits.served_names or (teacher.name,)
    ]  # fmt: skip
    return web.json_response({"object": "list", "data": cards})

  async def health(request):
    return web.Response(status=200)

  app.on_startup.append(on_startup)
  app.on_cleanup.append(on_cleanup)
  app.router.add_post("/v1/completions", route(handle_completion))
  app.router.add_post("/v1/chat/completions", route(handle_chat))
  app.router.add_get("/v1/models", models)
  app.router.add_get("/health", health)
  return app


async def _start(app, host: str, port: int) -> tuple[web.AppRunner, int]:
  # handler_cancellation: a client that goes away cancels its handler, so its queued job is
  # dropped instead of generated for nobody (the SDK's retries would queue more).
  runner = web.AppRunner(app, shutdown_timeout=5.0, handler_cancellation=True)
  await runner.setup()
  site = web.TCPSite(runner, host, port)
  await site.start()
  return runner, runner.addresses[0][1]


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
  p.add_argument(
    "--served_model_name",
    default=None,
    help="model ids answered, comma-separated; the first is reported (default: the dir name); "
    "any other `model` gets a 404",
  )
  p.add_argument("--max_n", type=int, default=128, help="largest n (samples per prompt)")
  p.add_argument("--max_rows", type=int, default=1024, help="largest prompts x n a request")
  p.add_argument(
    "--max_prompt_chars",
    type=int,
    default=None,
    help="longest prompt in characters, checked before tokenising (default: 32 x context length)",
  )
  p.add_argument("--max_body_mb", type=float, default=64, help="largest request body (413)")
  p.add_argument("--exit_with_parent", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  names = tuple(n for n in (args.served_model_name or "").split(",") if n)
  teacher = engine.LocalTeacher.from_pretrained(
    args.model, dtype=args.dtype, name=names[0] if names else None, max_batch=args.max_batch
  )
  limits = Limits(
    served_names=names or (teacher.name,),
    max_tokens_cap=args.max_tokens_cap,
    max_n=args.max_n,
    max_rows=args.max_rows,
    max_prompt_chars=args.max_prompt_chars,
  )
  kwargs = dict(max_batch=args.max_batch, limits=limits, max_body_mb=args.max_body_mb)
  asyncio.run(serve(teacher, args.host, args.port, args.exit_with_parent, **kwargs))
  # Shut down: the server is closed and nothing is left to flush; skipping the interpreter's
  # teardown (torch, imported by transformers, alone takes seconds) makes stop() quick.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)
