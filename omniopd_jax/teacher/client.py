"""TeacherClient: an asyncio/aiohttp teacher client on a daemon thread for the synchronous train loop.

Submit forks, collect futures. Bounded in-flight, rpm / input-tpm / output-tpm pacing, retries with
full-jitter backoff (honouring Retry-After), a shared pause after 429 storms, a disk cache keyed by
request and sample index, cost accounting with a budget cap, a start-up probe and per-step metrics.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import _base as _fbase  # the state names _Future needs
from typing import Any

import aiohttp
import numpy as np

from omniopd_jax.teacher import backends as tb

TeacherRequest = tb.TeacherRequest
Sample = tb.Sample

log = logging.getLogger(__name__)

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
  "cache_dir": None,  # disk cache of successful samples; None: off
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
  "storm_threshold": 8,  # this many 429/529 within storm_window_s pause all traffic
  "storm_window_s": 2.0,
  "storm_pause_s": 2.0,  # first pause; doubles per consecutive storm up to backoff_cap_s
  "rate_burst_s": 10.0,  # token buckets hold this many seconds of rate
}


class TeacherError(RuntimeError):
  """The teacher cannot be used as configured (auth, unknown model, unusable probe answer)."""


class TeacherCapabilityError(TeacherError):
  """The teacher refuses something the method needs (prefill, temperature) or an approximate
  mode was found while the config does not allow it."""


class TokenBucket:
  """Leaky bucket of `per_minute` units, holding at most `burst_s` seconds of rate.

  A single take larger than the capacity is allowed once the bucket is full (it leaves debt), so
  one big prompt never deadlocks. `refund` reconciles an estimate with the reported usage.
  """

  def __init__(self, per_minute: float, burst_s: float = 10.0, clock=time.monotonic):
    self.rate = float(per_minute) / 60.0
    self.capacity = max(1.0, self.rate * burst_s)
    self.level = self.capacity
    self._clock = clock
    self._t = clock()
    self._lock: asyncio.Lock | None = None

  def delay(self, amount: float) -> float:
    """Seconds until `amount` can be taken (0: now)."""
    now = self._clock()
    self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
    self._t = now
    need = min(amount, self.capacity)
    return 0.0 if self.level >= need else (need - self.level) / self.rate

  def take(self, amount: float) -> None:
    self.level -= amount

  def refund(self, amount: float) -> None:
    self.level = min(self.capacity, self.level + amount)

  async def acquire(self, amount: float) -> None:
    self._lock = self._lock or asyncio.Lock()
    async with self._lock:  # FIFO: a big request is not starved by small ones
      while (wait := self.delay(amount)) > 0:
        await asyncio.sleep(wait)
      self.take(amount)


class DiskCache:
  """Successful samples in one SQLite file (WAL), keyed by sha256(backend, model, mode, request,
  sample index). The sample index is part of the key: two samples of one prefix never share an
  entry, and a rerun of a step reads back the same N draws. Errors are never cached.

  One SQLite file, not a file per sample: a file create costs ~1 ms on a VM disk, a batched
  insert a few microseconds. Keep cache_dir on a local disk (SQLite over NFS is unsafe).
  """

  def __init__(self, root: str, namespace: str):
    os.makedirs(root, exist_ok=True)
    self.path = os.path.join(root, "teacher_cache.sqlite")
    self.namespace = namespace
    self._reader = self._connect()  # used by the event-loop thread only
    self._writer: sqlite3.Connection | None = None  # opened by the writer thread

  def _connect(self) -> sqlite3.Connection:
    db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS samples (key BLOB PRIMARY KEY, value TEXT NOT NULL)")
    db.commit()
    return db

  def keys(self, req: TeacherRequest) -> list[bytes]:
    """One key per sample index of `req`."""
    ids = None if req.prefix_token_ids is None else list(req.prefix_token_ids)
    fields = [self.namespace, req.prefix_text, ids, req.problem, req.system, req.max_tokens]
    fields += [req.temperature, req.seed, list(req.stop)]
    base = hashlib.sha256(json.dumps(fields).encode())
    out = []
    for i in range(req.num_samples):
      h = base.copy()
      h.update(b"#%d" % i)
      out.append(h.digest())
    return out

  def get_many(self, keys: list[bytes]) -> dict[bytes, Sample]:
    found = {}
    for lo in range(0, len(keys), 500):
      chunk = keys[lo : lo + 500]
      marks = ",".join("?" * len(chunk))
      for key, value in self._reader.execute(
        f"SELECT key, value FROM samples WHERE key IN ({marks})", chunk
      ):
        d = json.loads(value)
        ids = d["token_ids"]
        found[key] = Sample(d["text"], None, d["finish_reason"], None if ids is None else tuple(ids),
                            d["tokens_in"], d["tokens_out"], d["mode"], True)  # fmt: skip
    return found

  def put_many(self, entries: list[tuple[bytes, Sample]]) -> None:
    rows = [
      (key, json.dumps({"text": s.text, "finish_reason": s.finish_reason, "tokens_in": s.tokens_in,
                        "tokens_out": s.tokens_out, "mode": s.mode,
                        "token_ids": None if s.token_ids is None else list(s.token_ids)}))
      for key, s in entries
    ]  # fmt: skip
    try:
      self._writer = self._writer or self._connect()
      with self._writer:  # one transaction per batch
        self._writer.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?)", rows)
    except sqlite3.Error as e:  # a full disk must not break training: the entries are just lost
      log.warning("teacher cache write failed: %s", e)

  def close(self) -> None:
    for db in (self._reader, self._writer):
      if db is not None:
        db.close()


class _Stats:
  """Counters of one metrics interval (only the loop thread writes them)."""

  def __init__(self):
    self.requests = self.retries = self.n429 = self.overloaded = self.timeouts = 0
    self.pauses = self.cache_hits = self.samples_ok = self.samples_failed = 0
    self.tokens_in = self.tokens_out = 0
    self.cost_usd = 0.0
    self.latencies: list[float] = []


class _Future(concurrent.futures.Future):
  """A concurrent Future that shares its client's Condition.

  A stock Future builds its own Condition: eight objects the garbage collector keeps scanning,
  thousands of them per step, which cost more than the HTTP call itself against a fast server.
  Sharing one is safe because every wait here loops on this future's own state, so a wake-up
  meant for another future is ignored; concurrent.futures.wait/as_completed work unchanged.
  """

  def __init__(self, condition: threading.Condition):  # no super().__init__: no own Condition
    self._condition = condition
    self._state = _fbase.PENDING
    self._result = self._exception = None
    self._waiters, self._done_callbacks = [], []

  def _wait_done(self, timeout: float | None) -> None:
    end = None if timeout is None else time.monotonic() + timeout
    with self._condition:
      while self._state not in _DONE:
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
          return
        self._condition.wait(left)

  def result(self, timeout: float | None = None):
    self._wait_done(timeout)
    return super().result(0)

  def exception(self, timeout: float | None = None):
    self._wait_done(timeout)
    return super().exception(0)


_DONE = (_fbase.FINISHED, _fbase.CANCELLED, _fbase.CANCELLED_AND_NOTIFIED)


@dataclasses.dataclass(slots=True, eq=False)
class _Job:
  request: TeacherRequest
  future: concurrent.futures.Future
  samples: list
  remaining: int
  cache_keys: Any = None


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
    self.price_in, self.price_out = o["price_in_per_mtok"] / 1e6, o["price_out_per_mtok"] / 1e6
    self.budget_usd = None if o["budget_usd"] is None else float(o["budget_usd"])
    self._o = o
    self._rates = {
      k: TokenBucket(o[k], o["rate_burst_s"]) if o[k] else None
      for k in ("rpm", "input_tpm", "output_tpm")
    }
    self._paced = any(self._rates.values())
    self._send = getattr(backend, "send", None)
    self._base_url = backend.base_url
    self._cache = None
    if o["cache_dir"]:
      self._cache = DiskCache(o["cache_dir"], f"{backend.name}|{backend.model}|{backend.mode}")
    self._rng = random.Random()
    self._stats = _Stats()
    self._totals = {"cost_usd": 0.0, "tokens_in": 0, "tokens_out": 0, "requests": 0, "samples": 0}
    self._reserved_usd = 0.0
    self._halt: str | None = None
    self._gate_until = 0.0
    self._recent_429: collections.deque = collections.deque()
    self._storms = 0
    self._pending: set[_Job] = set()
    self._tasks: set[asyncio.Task] = set()
    self._queue: collections.deque = collections.deque()
    self._n_workers = self._n_busy = 0
    self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="teacher-cache")
    self._cache_batch: list = []
    self._condition = threading.Condition()  # shared by this client's futures
    self._closed = self._stopped = False
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(
      target=self._loop.run_forever, name="teacher-client", daemon=True
    )
    self._thread.start()
    self._call(self._open())

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
    chat_mode, version, budget = (
      o.pop("chat_mode"),
      o.pop("anthropic_version"),
      o.pop("thinking_budget"),
    )
    model_path = o.pop("model_path")
    if name == "openai_chat":
      kwargs["chat_mode"] = "continue_final_message" if chat_mode == "auto" else chat_mode
    elif name == "anthropic":
      kwargs["anthropic_version"] = version
    elif name == "gemini":
      kwargs["thinking_budget"] = budget
    if name == "local":  # imported lazily: it pulls in the sampler and JAX
      from omniopd_jax.teacher import local as teacher_local  # noqa: PLC0415

      backend = teacher_local.LocalBackend(model_path, **kwargs)
    else:
      backend = tb.make_backend(name, **kwargs)
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
    jobs = [self._make_job(r) for r in requests]
    self._loop.call_soon_threadsafe(self._start_jobs, jobs)
    return [j.future for j in jobs]

  def generate(self, requests: Sequence[TeacherRequest], timeout: float | None = None):
    """submit() and wait: a list (per request) of lists of Samples."""
    return [f.result(timeout) for f in self.submit(requests)]

  def flush(self) -> None:
    """Waits until the cache holds every sample delivered so far."""

    async def hand_over():
      self._flush_cache()

    self._call(hand_over())
    self._writer.submit(lambda: None).result()

  @property
  def halted(self) -> str | None:
    """Why the client stopped sending (budget, auth, spend limit, refused mode), or None."""
    return self._halt

  @property
  def budget_exhausted(self) -> bool:
    return self._halt is not None and self._halt.startswith("budget")

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
      samples, verdict = self._call(self._probe_once(req), timeout)
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
        if self.allow_approximate and b.mode != tb.INSTRUCTED:
          b.set_chat_mode(tb.INSTRUCTED)
          continue
      reason = samples[0].error
      if verdict is not None and verdict.capability:
        raise TeacherCapabilityError(reason)
      raise TeacherError(f"teacher probe failed: {reason}")
    else:
      raise TeacherError(f"teacher probe failed: {samples[0].error}")
    self._check_mode()
    if self._cache is not None:
      self._cache.namespace = f"{b.name}|{b.model}|{b.mode}"
    info = {
      "backend": b.name, "model": b.model, "mode": b.mode, "approximate": b.approximate,
      "samples_per_request": b.caps.samples_per_request, "prompts_per_request": b.caps.prompts_per_request,
      "latency_s": time.perf_counter() - t0, "text": next(s.text for s in samples if s.ok),
    }  # fmt: skip
    log.info("teacher probe ok: %s", {k: v for k, v in info.items() if k != "text"})
    return info

  def metrics(self, reset: bool = True) -> dict[str, float]:
    """Counters since the last reset (per step), plus run totals."""
    return self._call(self._snapshot(reset))

  def state_dict(self) -> dict[str, float]:
    """Cumulative counters (cost, tokens) for checkpoints (also after close())."""
    return dict(self._totals) if self._stopped else self._call(self._totals_copy())

  def load_state_dict(self, state: Mapping[str, float]) -> None:
    async def load():
      for k in self._totals:
        if k in state:
          self._totals[k] = type(self._totals[k])(state[k])

    self._call(load())

  def close(self, timeout: float = 30.0) -> None:
    """Stops the loop; requests still pending resolve with failures ("client closed")."""
    if self._closed:
      return
    self._closed = True
    try:
      self._call(self._shutdown(), timeout)
    finally:
      self._stopped = True
      self._loop.call_soon_threadsafe(self._loop.stop)
      self._thread.join(timeout)
      self._writer.shutdown(wait=True)  # every cache write lands before close() returns
      if self._cache is not None:
        self._cache.close()
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

  def _make_job(self, r: TeacherRequest) -> _Job:
    r = self._resolve(r)
    return _Job(r, _Future(self._condition), [None] * r.num_samples, r.num_samples)

  # ----------------------------------------------------------------------------- loop thread only

  async def _open(self):
    connector = aiohttp.TCPConnector(limit=self.max_in_flight, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=min(10.0, self.timeout_s))
    # Headers (and the key) live on the session: no per-request header merge.
    headers = {"Content-Type": "application/json", **self.backend.auth_headers()}
    self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)
    self._budget_cv = asyncio.Condition()

  def _start_jobs(self, jobs: list[_Job]) -> None:
    try:
      self._start_jobs_unsafe(jobs)
    except Exception as e:  # a bug here must not leave futures hanging
      log.exception("teacher client internal error")
      for job in jobs:
        for i, s in enumerate(job.samples):
          if s is None:
            self._fill(job, i, tb.failure(f"internal error: {e!r}", self.backend.mode))

  def _start_jobs_unsafe(self, jobs: list[_Job]) -> None:
    items, cache = [], self._cache
    if self._halt:
      for job in jobs:
        self._pending.add(job)
        for i in range(job.request.num_samples):
          self._fill(job, i, tb.failure(self._halt, self.backend.mode))
      return
    hits = {}
    if cache is not None:
      for job in jobs:
        job.cache_keys = cache.keys(job.request)
      hits = cache.get_many([k for job in jobs for k in job.cache_keys])
    for job in jobs:
      self._pending.add(job)
      missing = range(job.request.num_samples)
      if hits:
        missing = []
        for i, key in enumerate(job.cache_keys):
          hit = hits.get(key)
          if hit is None:
            missing.append(i)
          else:
            self._stats.cache_hits += 1
            self._fill(job, i, hit)
      if missing:
        items.append((len(items), job.request, missing, job))
    if items:
      jobs_by_item = [it[3] for it in items]
      # Calls are built when a worker takes them, so only the in-flight ones exist at a time.
      self._enqueue([(runs, jobs_by_item) for runs in self.backend.plan(items)])

  def _enqueue(self, flights) -> None:
    self._queue.extend(flights)
    # One worker per in-flight slot, started on demand; a worker exits when the queue is empty.
    while self._n_workers < min(self.max_in_flight, len(self._queue) + self._n_busy):
      self._n_workers += 1
      task = self._loop.create_task(self._worker())
      self._tasks.add(task)
      task.add_done_callback(self._tasks.discard)

  async def _worker(self) -> None:
    queue = self._queue
    try:
      while queue:
        item = queue.popleft()  # an HttpCall (retries, probe) or (runs, jobs) to build one from
        self._n_busy += 1
        try:
          if type(item) is tuple:
            call = self.backend.make_call(item[0])
            call.jobs = item[1]
          else:
            call = item
          await self._attempt(call)
        except asyncio.CancelledError:
          raise
        except Exception as e:  # a bug here must not lose samples
          log.exception("teacher client internal error")
          reason = f"internal error: {e!r}"
          if type(item) is tuple:
            for item_id, _, idxs in item[0]:
              for i in idxs:
                self._fill(item[1][item_id], i, tb.failure(reason, self.backend.mode))
          else:
            self._finish(item, self._failed(item, reason), None)
        finally:
          self._n_busy -= 1
    finally:
      self._n_workers -= 1

  def _fill(self, job: _Job, index: int, sample: Sample) -> None:
    if job.samples[index] is not None:
      return  # first answer wins: a sample is never delivered (or billed) twice
    job.samples[index] = sample
    job.remaining -= 1
    if sample.ok:
      self._stats.samples_ok += 1
    else:
      self._stats.samples_failed += 1
    if job.remaining == 0:
      self._pending.discard(job)
      try:
        job.future.set_result(job.samples)
      except concurrent.futures.InvalidStateError:  # the caller cancelled it: let wait() see that
        job.future.set_running_or_notify_cancel()

  def _finish(self, flight: tb.HttpCall, samples: list[Sample], verdict) -> None:
    if flight.waiter is not None:  # the probe
      if not flight.waiter.done():
        flight.waiter.set_result((samples, verdict))
      return
    jobs, slots = flight.jobs, flight.slots
    if self._cache is not None:  # queued before the futures resolve, so flush() sees them
      writes = [(jobs[item].cache_keys[index], s) for (item, index), s in zip(slots, samples)
                if s is not None and s.ok and jobs[item].samples[index] is None]  # fmt: skip
      if writes:
        if not self._cache_batch:  # one insert transaction per loop pass, off the event loop
          self._loop.call_soon(self._flush_cache)
        self._cache_batch.extend(writes)
    for (item, index), s in zip(slots, samples):
      if s is not None:
        self._fill(jobs[item], index, s)

  def _flush_cache(self) -> None:
    if self._cache_batch:
      self._writer.submit(self._cache.put_many, self._cache_batch)
      self._cache_batch = []

  @staticmethod
  def _failed(call: tb.HttpCall, reason: str) -> list[Sample]:
    return [tb.failure(reason, call.mode)] * len(call.slots)

  async def _reserve(self, cost: float) -> bool:
    """Holds `cost` of the budget for an in-flight call; False once the cap would be passed."""
    async with self._budget_cv:
      while self._totals["cost_usd"] + self._reserved_usd + cost > self.budget_usd:
        if self._reserved_usd <= 0 or self._halt:
          self._halt = self._halt or (
            f"budget cap reached: ${self._totals['cost_usd']:.4f} spent of budget_usd="
            f"{self.budget_usd}; raise teacher.budget_usd to continue"
          )
          return False
        await self._budget_cv.wait()
      self._reserved_usd += cost
      return True

  async def _release(self, cost: float) -> None:
    async with self._budget_cv:
      self._reserved_usd -= cost
      self._budget_cv.notify_all()

  async def _attempt(self, flight: tb.HttpCall) -> None:
    """Sends `flight` once; then finishes it, or schedules its retry after a backoff."""
    call, loop = flight, self._loop
    if self._halt:
      return self._finish(flight, self._failed(flight, self._halt), flight.verdict)
    if self._gate_until:  # a shared pause after 429s
      while (wait := self._gate_until - loop.time()) > 0:
        await asyncio.sleep(wait)
    budget = self.budget_usd is not None
    if budget:
      est_cost = call.est_tokens_in * self.price_in + call.max_tokens_out * self.price_out
      if not await self._reserve(est_cost):
        return self._finish(flight, self._failed(flight, self._halt), flight.verdict)
    try:
      if self._paced:
        rates = self._rates
        if rates["rpm"]:
          await rates["rpm"].acquire(1)
        if rates["input_tpm"]:
          await rates["input_tpm"].acquire(call.est_tokens_in)
        if rates["output_tpm"]:
          await rates["output_tpm"].acquire(call.max_tokens_out)
      stats = self._stats
      stats.requests += 1
      self._totals["requests"] += 1
      if flight.attempt:
        stats.retries += 1
      t0 = time.perf_counter()
      flight.first_t = flight.first_t or t0
      try:
        if self._send is not None:  # an in-process backend (`local`): same protocol, no HTTP
          status, headers, raw = await self._send(call, call.data)
        else:
          async with self._session.post(self._base_url + call.path, data=call.data) as resp:
            raw = await resp.read()
          status, headers = resp.status, resp.headers
        verdict = self.backend.classify(status, headers, raw)
      except TimeoutError:
        stats.timeouts += 1
        verdict = tb.Verdict("retry", f"timeout: no full answer within timeout_s={self.timeout_s}")
      except (aiohttp.ClientError, OSError) as e:
        verdict = tb.Verdict("retry", f"connection error: {type(e).__name__}: {e}")
      if verdict.kind == "ok":
        try:
          samples = self.backend.parse(call, verdict.body)
        except (tb.MalformedResponse, AttributeError, TypeError, KeyError, ValueError) as e:
          verdict = tb.Verdict("retry", f"malformed answer: {e}")
        else:
          self._account(call, samples, time.perf_counter() - flight.first_t)
          if flight.attempt < self.max_retries and flight.jobs is not None:
            for s in samples:
              if s.error is not None:
                self._retry_missing(flight, samples)
                break
          return self._finish(flight, samples, verdict)
    finally:
      if budget:
        await self._release(est_cost)
    flight.verdict = verdict
    if verdict.rate_limited:
      self._on_rate_limited(verdict)
    if verdict.kind == "halt":
      if not (flight.waiter is not None and verdict.capability):
        self._halt = self._halt or verdict.reason
        log.error("teacher halted: %s", verdict.reason)
      return self._finish(flight, self._failed(flight, verdict.reason), verdict)
    if verdict.kind == "fatal":
      items = {}
      for item, index in call.slots:
        items.setdefault(item, []).append(index)
      if len(items) > 1 and flight.jobs is not None:
        # One bad prompt (say, too long) fails a packed call: retry its prompts one per call.
        runs = [(item, flight.jobs[item].request, idxs) for item, idxs in items.items()]
        calls = self.backend.pack(runs, prompts_per_request=1)
        for c in calls:
          c.jobs, c.attempt = flight.jobs, flight.attempt
        return self._enqueue(calls)
      return self._finish(flight, self._failed(flight, verdict.reason), verdict)
    if flight.attempt >= self.max_retries:
      reason = f"gave up after {flight.attempt + 1} attempts; last: {verdict.reason}"
      return self._finish(flight, self._failed(flight, reason), verdict)
    flight.attempt += 1
    # The worker moves on; the retry re-enters the queue after its backoff.
    loop.call_later(
      self._backoff(flight.attempt - 1, verdict.retry_after_s), self._enqueue, [flight]
    )

  def _retry_missing(self, flight: tb.HttpCall, samples: list[Sample]) -> None:
    """Asks again for the samples a (truncated or proxied) answer left out; the rest stand."""
    missing = {}
    for j, ((item, index), s) in enumerate(zip(flight.slots, samples)):
      if not s.ok and s.error.endswith(tb.MISSING):
        missing.setdefault(item, []).append(index)
        samples[j] = None  # _fill skips it; the retry fills it
    if missing:
      runs = [(item, flight.jobs[item].request, idxs) for item, idxs in missing.items()]
      retry = self.backend.pack(runs)
      for call in retry:
        call.jobs, call.attempt = flight.jobs, flight.attempt + 1
      self._loop.call_later(self._backoff(flight.attempt, None), self._enqueue, retry)

  def _backoff(self, attempt: int, retry_after: float | None) -> float:
    base, cap = self._o["backoff_base_s"], self._o["backoff_cap_s"]
    if retry_after is not None:
      return min(retry_after, self._o["max_retry_wait_s"]) + self._rng.uniform(0, base)
    return self._rng.uniform(0, min(cap, base * 2**attempt))

  def _on_rate_limited(self, verdict: tb.Verdict) -> None:
    """A 429/529: honour Retry-After for all traffic; pause everything after a storm."""
    now = self._loop.time()
    if verdict.status == 429:
      self._stats.n429 += 1
    else:
      self._stats.overloaded += 1
    if verdict.retry_after_s is not None:
      wait = min(verdict.retry_after_s, self._o["max_retry_wait_s"])
      self._gate_until = max(self._gate_until, now + wait)
    recent = self._recent_429
    recent.append(now)
    while recent and recent[0] < now - self._o["storm_window_s"]:
      recent.popleft()
    if len(recent) >= self._o["storm_threshold"]:
      pause = min(self._o["backoff_cap_s"], self._o["storm_pause_s"] * 2**self._storms)
      self._storms += 1
      recent.clear()
      self._stats.pauses += 1
      self._gate_until = max(self._gate_until, now + pause)
      log.warning("teacher: 429/529 storm, pausing all requests for %.2fs", pause)

  def _account(self, call: tb.HttpCall, samples: list[Sample], latency: float) -> None:
    if len(samples) == 1:
      t_in, t_out = samples[0].tokens_in, samples[0].tokens_out
    else:
      t_in = t_out = 0
      for s in samples:
        t_in += s.tokens_in
        t_out += s.tokens_out
    cost = t_in * self.price_in + t_out * self.price_out
    st, tot = self._stats, self._totals
    st.tokens_in += t_in
    st.tokens_out += t_out
    st.cost_usd += cost
    st.latencies.append(latency)
    tot["tokens_in"] += t_in
    tot["tokens_out"] += t_out
    tot["cost_usd"] += cost
    tot["samples"] += len(samples)
    self._storms = 0
    if self._paced:  # reconcile the up-front estimates with the reported usage
      if self._rates["input_tpm"]:
        self._rates["input_tpm"].refund(call.est_tokens_in - t_in)
      if self._rates["output_tpm"]:
        self._rates["output_tpm"].refund(call.max_tokens_out - t_out)

  async def _probe_once(self, req: TeacherRequest):
    flight = self.backend.pack([(0, req, range(req.num_samples))])[0]
    flight.waiter = self._loop.create_future()
    self._enqueue([flight])
    return await flight.waiter

  async def _snapshot(self, reset: bool) -> dict[str, float]:
    s = self._stats
    if reset:
      self._stats = _Stats()
    lat = np.asarray(s.latencies, np.float64)
    p50, p95 = np.percentile(lat, [50, 95]) if lat.size else (0.0, 0.0)
    return {
      "teacher/requests": s.requests, "teacher/retries": s.retries, "teacher/429s": s.n429,
      "teacher/overloaded": s.overloaded, "teacher/timeouts": s.timeouts, "teacher/pauses": s.pauses,
      "teacher/latency_p50_s": float(p50), "teacher/latency_p95_s": float(p95),
      "teacher/tokens_in": s.tokens_in, "teacher/tokens_out": s.tokens_out,
      "teacher/cost_usd": s.cost_usd, "teacher/cost_usd_total": self._totals["cost_usd"],
      "teacher/samples_ok": s.samples_ok, "teacher/samples_failed": s.samples_failed,
      "teacher/cache_hits": s.cache_hits, "teacher/approximate": float(self.backend.approximate),
      "teacher/pending_forks": len(self._pending),
    }  # fmt: skip

  async def _totals_copy(self):
    return dict(self._totals)

  async def _shutdown(self):
    self._queue.clear()
    for t in list(self._tasks):
      t.cancel()
    await asyncio.gather(*self._tasks, return_exceptions=True)
    for job in list(self._pending):
      for i, s in enumerate(job.samples):
        if s is None:
          self._fill(
            job, i, tb.failure("client closed before the teacher answered", self.backend.mode)
          )
    self._flush_cache()
    await self._session.close()
