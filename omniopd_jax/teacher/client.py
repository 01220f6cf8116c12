"""TeacherClient: an asyncio/aiohttp teacher client on a daemon thread for the synchronous train loop.

Submit forks, collect futures. Bounded in-flight, rpm / input-tpm / output-tpm pacing (`pacing`),
retries with full-jitter backoff (honouring Retry-After), a shared pause after 429 storms, a disk
cache keyed by request and sample index (`cache`), cost accounting with a budget cap (`budget`), a
start-up probe and per-step metrics. The event-loop side lives in `dispatch`.
"""

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from omniopd_jax.teacher import backends as tb
from omniopd_jax.teacher import dispatch, secrets
from omniopd_jax.teacher.errors import TeacherCapabilityError, TeacherError, TeacherHalted
from omniopd_jax.teacher.wire import INSTRUCTED, Sample, TeacherRequest

__all__ = ["DEFAULTS", "Sample", "TeacherCapabilityError", "TeacherClient", "TeacherError",
           "TeacherHalted", "TeacherRequest"]  # fmt: skip

log = logging.getLogger(__name__)
# The loggers of the client's modules: their records are scrubbed of the client's secrets.
LOGGERS = tuple(
  f"omniopd_jax.teacher.{m}" for m in ("client", "dispatch", "pacing", "cache", "budget")
)

# Config fields from_config understands, with defaults (everything else is a typo: error).
DEFAULTS: dict[str, Any] = {
  "backend": "openai_completions",
  "base_url": None,  # None: the backend's public endpoint (local servers: http://127.0.0.1:8000/v1)
  "model": "teacher",
  "api_key_env": None,  # NAME of the env var holding the key; None: no key (local servers)
  "max_in_flight": 64,  # concurrent HTTP requests
  "rpm": None,  # requests per minute; None: unpaced
  "input_tpm": None,  # input tokens per minute (estimated up front, reconciled from usage)
  "output_tpm": None,  # output tokens per minute (max_tokens x n reserved up front)
  "max_retries": 6,  # retries per HTTP call after the first attempt
  "timeout_s": 60.0,  # per attempt, connect to last byte
  "cache_dir": None,  # disk cache of the teacher's draws (empty ones too); None: off
  "price_in_per_mtok": 0.0,  # USD per 1M input tokens
  "price_out_per_mtok": 0.0,  # USD per 1M output tokens (Gemini thinking tokens count as output)
  "budget_usd": None,  # stop sending once the next call could pass this; None: no cap
  "allow_approximate": False,  # allow the approximate "instructed" chat mode
  "temperature": 1.0,  # default for requests that leave it None
  "max_tokens": 64,  # default for requests that leave it None
  # Less common knobs.
  "chat_mode": "auto",  # openai_chat: auto | continue_final_message | trailing_assistant | instructed
  "samples_per_request": None,  # override the backend's samples per HTTP call
  "prompts_per_request": None,  # override the backend's prompts per HTTP call
  "extra_body": None,  # merged into every payload, e.g. {"add_special_tokens": False} for vLLM
  "anthropic_version": "2023-06-01",
  "thinking_budget": 0,  # gemini thinkingBudget; None: leave the model's default
  "model_path": None,  # local: HF checkpoint directory served in process (teacher_local)
  "backoff_base_s": 0.5,  # full jitter: sleep U(0, min(cap, base * 2**attempt))
  "backoff_cap_s": 30.0,
  "max_retry_wait_s": 120.0,  # cap on a server's Retry-After
  "halt_after_failed_calls": 8,  # halt ("unreachable") after this many calls in a row gave up
  "storm_threshold": 8,  # this many 429/529 within storm_window_s pause all traffic
  "storm_window_s": 2.0,
  "storm_pause_s": 2.0,  # first pause; doubles per consecutive storm up to backoff_cap_s
  "rate_burst_s": 10.0,  # token buckets hold this many seconds of rate
}


BACKEND_FIELDS = ("chat_mode", "anthropic_version", "thinking_budget", "model_path")


class TeacherClient:
  """Asynchronous teacher client. Thread-safe `submit`; all network work runs on one daemon
  thread's event loop. Every submitted request resolves to exactly `num_samples` Samples."""

  def __init__(self, backend: tb.Backend, **options):
    unknown = set(options) - set(DEFAULTS)
    if unknown:
      raise ValueError(
        f"unknown TeacherClient options {sorted(unknown)}; known: {sorted(DEFAULTS)}"
      )
    o = {**DEFAULTS, **options}
    self.backend = backend
    self.allow_approximate = bool(o["allow_approximate"])
    self._check_mode()
    self.temperature, self.max_tokens = float(o["temperature"]), int(o["max_tokens"])
    self.max_in_flight, self.max_retries = int(o["max_in_flight"]), int(o["max_retries"])
    self.timeout_s = float(o["timeout_s"])
    self.budget_usd = None if o["budget_usd"] is None else float(o["budget_usd"])
    self._closed = self._stopped = False
    self._loop = asyncio.new_event_loop()
    self._pool = dispatch.WorkerPool(backend, o, self._loop)
    secrets.install(self._pool.redactor, LOGGERS)
    self._thread = threading.Thread(
      target=self._loop.run_forever, name="teacher-client", daemon=True
    )
    self._thread.start()
    self._call(self._pool.open())

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "TeacherClient":
    """Builds a client from a teacher ConfigDict/dict (fields: see DEFAULTS)."""
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
      raise ValueError(
        f"unknown teacher config fields {sorted(unknown)}; known: {sorted(DEFAULTS)}"
      )
    o = {**DEFAULTS, **cfg}
    api_key = None
    if o["api_key_env"]:
      api_key = os.environ.get(o["api_key_env"])
      if not api_key:
        raise ValueError(
          f"teacher.api_key_env names {o['api_key_env']!r} but that environment variable is "
          "empty or unset; export it (keys are read from the environment only)."
        )
    name = o.pop("backend")
    kwargs = dict(
      model=o.pop("model"), base_url=o.pop("base_url"), api_key=api_key,
      samples_per_request=o.pop("samples_per_request"),
      prompts_per_request=o.pop("prompts_per_request"), extra_body=o.pop("extra_body"),
    )  # fmt: skip
    chat_mode = o["chat_mode"]
    if chat_mode == "auto":
      o["chat_mode"] = "continue_final_message"
    cls_backend = tb.backend_class(name)
    for field in BACKEND_FIELDS:  # each API takes the config fields it names in `config_fields`
      value = o.pop(field)
      if field in cls_backend.config_fields:
        kwargs[field] = value
    backend = cls_backend(**kwargs)
    o.pop("api_key_env")
    client = cls(backend, **o)
    client._auto_chat = name == "openai_chat" and chat_mode == "auto"
    client._owns_backend = True  # close() also stops an in-process server
    return client

  def __repr__(self) -> str:
    return f"TeacherClient({self.backend!r}, max_in_flight={self.max_in_flight})"

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ---------------------------------------------------------------------- public API (any thread)

  def submit(self, requests: Sequence[TeacherRequest]) -> list[concurrent.futures.Future]:
    """Queues requests; returns one future per request, resolving to its list of Samples."""
    if self._closed:
      raise RuntimeError("TeacherClient.submit after close().")
    jobs = [dispatch.new_job(self._resolve(r)) for r in requests]
    self._loop.call_soon_threadsafe(self._pool.start_jobs, jobs)
    return [j.future for j in jobs]

  def generate(self, requests: Sequence[TeacherRequest], timeout: float | None = None):
    """submit() and wait: a list (per request) of lists of Samples."""
    return [f.result(timeout) for f in self.submit(requests)]

  def flush(self) -> None:
    """Waits until the cache holds every sample delivered so far."""

    async def hand_over():
      self._pool.flush_cache()

    self._call(hand_over())
    self._pool.wait_for_writes()

  @property
  def halted(self) -> str | None:
    """Why the client stopped sending (budget, auth, spend limit, refused mode), or None."""
    return self._pool.halt

  @property
  def halt_error(self) -> TeacherHalted | None:
    """The TeacherHalted naming why the client stopped sending, or None while it runs."""
    return self._pool.halt_error

  def raise_if_halted(self) -> None:
    """Raises TeacherHalted once the client halted (auth, spend limit, budget, unreachable...):
    the train loop calls it after each step's teacher wait, so the run stops instead of training
    on failures."""
    if self._pool.halt_error is not None:
      raise self._pool.halt_error

  def halt(self, reason: str = "stopped by the caller") -> None:
    """Stops sending now; callable from any thread and from a signal handler (it only schedules).
    Pending requests resolve with failures within moments, later ones fail at once, and
    raise_if_halted raises TeacherHalted("stopped", reason): a SIGTERM handler calls this so the
    step's teacher wait ends at once instead of after a failing teacher's retries."""
    if not self._closed:
      self._loop.call_soon_threadsafe(self._pool.halt_now, "stopped", reason)

  @property
  def budget_exhausted(self) -> bool:
    halt = self._pool.halt
    return halt is not None and halt.startswith("budget")

  def probe(self, timeout: float | None = None) -> dict[str, Any]:
    """Sends one tiny continuation request: checks prefill, temperature and samples-per-request.

    Lowers samples_per_request when the API refuses several; with chat_mode "auto" falls back
    to "instructed" only when allow_approximate. Raises TeacherCapabilityError / TeacherError.
    """
    timeout = timeout or self.timeout_s * (self.max_retries + 2)
    b = self.backend
    for _ in range(3):
      req = self._resolve(
        TeacherRequest(
          key="probe", problem="What is 2 + 3?", prefix_text="2 + 3 =" if b.name != "openai_completions"
          else "Question: What is 2 + 3?\nAnswer: 2 + 3 =", num_samples=min(2, b.caps.samples_per_request),
          max_tokens=4, seed=0,
        )
      )  # fmt: skip
      t0 = time.perf_counter()
      samples, verdict = self._call(self._pool.probe_once(req), timeout)
      if any(s.ok for s in samples):
        break
      if verdict is not None and verdict.capability == "samples" and b.caps.samples_per_request > 1:
        b.set_samples_per_request(1)
        continue
      if (
        verdict is not None
        and verdict.capability == "prefill"
        and getattr(self, "_auto_chat", False)
      ):
        # Only to "instructed": a server that ignores a trailing assistant turn would silently
        # answer afresh, so trailing_assistant is never guessed, only configured.
        if self.allow_approximate and b.mode != INSTRUCTED:
          b.set_chat_mode(INSTRUCTED)
          continue
      reason = samples[0].error
      self.raise_if_halted()  # budget spent, key refused, spend limit...: TeacherHalted
      if verdict is not None and verdict.capability:
        raise TeacherCapabilityError(reason)
      raise TeacherError(f"teacher probe failed: {reason}")
    else:
      raise TeacherError(f"teacher probe failed: {samples[0].error}")
    self._check_mode()
    if self._pool.cache is not None:
      self._pool.cache.namespace = f"{b.name}|{b.model}|{b.mode}"
    info = {
      "backend": b.name, "model": b.model, "mode": b.mode, "approximate": b.approximate,
      "samples_per_request": b.caps.samples_per_request, "prompts_per_request": b.caps.prompts_per_request,
      "latency_s": time.perf_counter() - t0, "text": next(s.text for s in samples if s.ok),
    }  # fmt: skip
    log.info("teacher probe ok: %s", {k: v for k, v in info.items() if k != "text"})
    return info

  def metrics(self, reset: bool = True) -> dict[str, float]:
    """Counters since the last reset (per step), plus run totals."""
    return self._call(self._pool.snapshot(reset, self.backend.approximate))

  def state_dict(self) -> dict[str, float]:
    """Cumulative counters (cost, tokens) for checkpoints (also after close())."""
    return dict(self._pool.totals) if self._stopped else self._call(self._pool.totals_copy())

  def load_state_dict(self, state: Mapping[str, float]) -> None:
    self._call(self._pool.load_totals(state))

  def close(self, timeout: float = 30.0) -> None:
    """Stops the loop; requests still pending resolve with failures ("client closed")."""
    if self._closed:
      return
    self._closed = True
    try:
      self._call(self._pool.shutdown(), timeout)
    finally:
      self._stopped = True
      self._loop.call_soon_threadsafe(self._loop.stop)
      self._thread.join(timeout)
      self._pool.close_writer()
      secrets.uninstall(self._pool.redactor)
      if getattr(self, "_owns_backend", False) and hasattr(self.backend, "close"):
        self.backend.close()

  # ------------------------------------------------------------------------- caller-thread helpers

  def _call(self, coro, timeout: float | None = None):
    if self._stopped:
      coro.close()
      raise RuntimeError("TeacherClient is closed.")
    return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

  def _check_mode(self) -> None:
    if self.backend.approximate and not self.allow_approximate:
      raise TeacherCapabilityError(
        f"teacher {self.backend.name} {self.backend.model} runs in the approximate 'instructed' mode "
        "(not a sample of p_teacher(. | prefix)); set teacher.allow_approximate=True to train on it."
      )

  def _resolve(self, r: TeacherRequest) -> TeacherRequest:
    """Fills config defaults and normalises types (numpy ids, list stops) on the caller's thread."""
    ids = r.prefix_token_ids
    bad_ids = ids is not None and (type(ids) is not tuple or (ids and type(ids[0]) is not int))
    if r.max_tokens is None or r.temperature is None or bad_ids or type(r.stop) is not tuple:
      r = TeacherRequest(  # positional: a third of dataclasses.replace's cost
        r.key, r.prefix_text, tuple(np.asarray(ids).reshape(-1).tolist()) if bad_ids else ids,
        r.num_samples, self.max_tokens if r.max_tokens is None else r.max_tokens,
        self.temperature if r.temperature is None else r.temperature,
        r.seed, r.problem, r.system, tuple(r.stop),
      )  # fmt: skip
    if r.num_samples < 1 or r.max_tokens < 1 or r.temperature < 0:
      raise ValueError(
        f"request {r.key!r}: need num_samples >= 1, max_tokens >= 1, temperature >= 0."
      )
    self.backend.validate(r)
    return r
