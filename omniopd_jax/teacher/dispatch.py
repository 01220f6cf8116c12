"""The client's event-loop side: jobs in, cache look-ups, a pool of workers that send HTTP calls
with pacing, budget and retries, and samples delivered into each request's future.

Everything here runs on the TeacherClient's daemon thread; `TeacherClient` is the thread-safe face.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
from typing import Any

import aiohttp
import numpy as np

from omniopd_jax.teacher import futures, secrets
from omniopd_jax.teacher.apis.base import Backend
from omniopd_jax.teacher.budget import Budget
from omniopd_jax.teacher.cache import DiskCache
from omniopd_jax.teacher.errors import TeacherHalted, halt_kind
from omniopd_jax.teacher.pacing import Backoff, RateLimitGate, RateLimits
from omniopd_jax.teacher.wire import (
  MISSING,
  HttpCall,
  MalformedResponse,
  Sample,
  TeacherRequest,
  Verdict,
  failure,
)

log = logging.getLogger(__name__)


class Stats:
  """Counters of one metrics interval (only the loop thread writes them)."""

  def __init__(self):
    self.requests = self.retries = self.n429 = self.overloaded = self.timeouts = 0
    self.pauses = self.cache_hits = self.samples_ok = self.samples_failed = self.samples_empty = 0
    self.tokens_in = self.tokens_out = 0
    self.cost_usd = 0.0
    self.latencies: list[float] = []


@dataclasses.dataclass(slots=True, eq=False)
class Job:
  """One submitted request: its future and the samples delivered so far (None: not yet)."""

  request: TeacherRequest
  future: concurrent.futures.Future
  samples: list
  remaining: int
  cache_keys: Any = None


def new_job(request: TeacherRequest) -> Job:
  n = request.num_samples
  return Job(request, futures.new_future(), [None] * n, n)


class WorkerPool:
  """Sends the calls of submitted jobs: at most `max_in_flight` at once, each paced, budgeted and
  retried; `halt` (a reason) once every later call would fail too."""

  def __init__(self, backend: Backend, o: dict, loop: asyncio.AbstractEventLoop):
    self.backend, self.loop = backend, loop
    self.max_in_flight, self.max_retries = int(o["max_in_flight"]), int(o["max_retries"])
    self.timeout_s = float(o["timeout_s"])
    self.price_in, self.price_out = o["price_in_per_mtok"] / 1e6, o["price_out_per_mtok"] / 1e6
    self.budget = Budget(o["budget_usd"])
    self.rates = RateLimits(o["rpm"], o["input_tpm"], o["output_tpm"], o["rate_burst_s"])
    self.gate = RateLimitGate(
      o["storm_threshold"], o["storm_window_s"], o["storm_pause_s"], o["backoff_cap_s"],
      o["max_retry_wait_s"],
    )  # fmt: skip
    self.backoff = Backoff(o["backoff_base_s"], o["backoff_cap_s"], o["max_retry_wait_s"])
    self.cache = None
    if o["cache_dir"]:
      self.cache = DiskCache(o["cache_dir"], f"{backend.name}|{backend.model}|{backend.mode}")
    self._send = getattr(backend, "send", None)
    # Scrubs the key from everything handed out: gateways echo it in error bodies.
    self.redactor = secrets.Redactor(backend.secret_values())
    self.stats = Stats()
    self.totals = {"cost_usd": 0.0, "tokens_in": 0, "tokens_out": 0, "requests": 0, "samples": 0}
    self._loaded = dict.fromkeys(self.totals, 0)  # the part of `totals` a checkpoint brought
    self.halt: str | None = None  # why every later call would fail too (secrets scrubbed)
    self.halt_error: TeacherHalted | None = None
    self.halt_after_failed_calls = int(o["halt_after_failed_calls"] or 0)
    self._failed_in_a_row = 0  # calls that gave up after their retries, since the last answer
    self.pending: set[Job] = set()
    self._tasks: set[asyncio.Task] = set()
    self._queue: collections.deque = collections.deque()
    self._n_workers = self._n_busy = 0
    self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="teacher-cache")
    self._cache_batch: list = []

  async def open(self) -> None:
    connector = aiohttp.TCPConnector(limit=self.max_in_flight, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=min(10.0, self.timeout_s))
    # Headers (and the key) live on the session: no per-request header merge.
    headers = {"Content-Type": "application/json", **self.backend.auth_headers()}
    self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)

  # ------------------------------------------------------------------------------ jobs in

  def start_jobs(self, jobs: list[Job]) -> None:
    try:
      self._start_jobs(jobs)
    except Exception as e:  # a bug here must not leave futures hanging
      log.exception("teacher client internal error")
      for job in jobs:
        for i, s in enumerate(job.samples):
          if s is None:
            self._fill(job, i, failure(f"internal error: {e!r}", self.backend.mode))

  def _start_jobs(self, jobs: list[Job]) -> None:
    cache = self.cache
    if self.halt:
      for job in jobs:
        self.pending.add(job)
        for i in range(job.request.num_samples):
          self._fill(job, i, failure(self.halt, self.backend.mode))
      return
    hits = {}
    if cache is not None:
      for job in jobs:
        job.cache_keys = cache.keys(job.request)
      hits = cache.get_many([k for job in jobs for k in job.cache_keys])
    for job in jobs:
      self.pending.add(job)
      if hits:
        for i, key in enumerate(job.cache_keys):
          hit = hits.get(key)
          if hit is not None:
            self.stats.cache_hits += 1
            self._fill(job, i, hit)
    # Every job is planned, cached or not, so that a call's prompts, n and seed depend only on
    # what was submitted: a re-run step whose answers are partly cached sends exactly the calls
    # of the first run (each of those still missing a sample) and gets the same draws back.
    items = [(i, job.request, range(job.request.num_samples)) for i, job in enumerate(jobs)]
    plans = self.backend.plan(items)
    if hits:
      plans = [runs for runs in plans if _any_unfilled(runs, jobs)]
    # Calls are built when a worker takes them, so only the in-flight ones exist at a time.
    self.enqueue([(runs, jobs) for runs in plans])

  def enqueue(self, flights) -> None:
    self._queue.extend(flights)
    # One worker per in-flight slot, started on demand; a worker exits when the queue is empty.
    while self._n_workers < min(self.max_in_flight, len(self._queue) + self._n_busy):
      self._n_workers += 1
      task = self.loop.create_task(self._worker())
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
          self._fail_item(item, f"internal error: {e!r}")
        finally:
          self._n_busy -= 1
    finally:
      self._n_workers -= 1

  def _fail_item(self, item, reason: str) -> None:
    if type(item) is tuple:
      for item_id, _, idxs in item[0]:
        for i in idxs:
          self._fill(item[1][item_id], i, failure(reason, self.backend.mode))
    else:
      self._finish(item, self._failed(item, reason), None)

  def _halt(self, kind: str, reason: str) -> None:
    """Stops all sending for good (the first cause wins)."""
    if self.halt is None:
      self.halt, self.halt_error = reason, TeacherHalted(kind, reason)
      log.error("teacher halted (%s): %s", kind, reason)

  def halt_now(self, kind: str, reason: str) -> None:
    """Halts and gives up at once: queued calls dropped, in-flight ones cancelled, every pending
    request resolved with failures (a SIGTERM must not wait for a failing teacher's retries)."""
    self._halt(kind, reason)
    self._queue.clear()
    for task in list(self._tasks):
      task.cancel()
    for job in list(self.pending):
      for i, s in enumerate(job.samples):
        if s is None:
          self._fill(job, i, failure(self.halt, self.backend.mode))

  # ------------------------------------------------------------------------- samples out

  def _fill(self, job: Job, index: int, sample: Sample) -> None:
    if job.samples[index] is not None:
      return  # first answer wins: a sample is never delivered (or billed) twice
    if self.redactor:
      sample = self.redactor.scrub_sample(sample)
    job.samples[index] = sample
    job.remaining -= 1
    if sample.ok:
      self.stats.samples_ok += 1
    elif sample.empty:
      self.stats.samples_empty += 1
    else:
      self.stats.samples_failed += 1
    if job.remaining == 0:
      self.pending.discard(job)
      futures.resolve(job.future, job.samples)

  def _finish(self, flight: HttpCall, samples: list[Sample], verdict) -> None:
    if self.redactor:  # before the cache and the probe see them
      samples = [s if s is None else self.redactor.scrub_sample(s) for s in samples]
    if flight.waiter is not None:  # the probe
      if not flight.waiter.done():
        flight.waiter.set_result((samples, verdict))
      return
    jobs, slots = flight.jobs, flight.slots
    if self.cache is not None:  # queued before the futures resolve, so flush() sees them
      writes = [(jobs[item].cache_keys[index], s) for (item, index), s in zip(slots, samples)
                if s is not None and s.settled and jobs[item].samples[index] is None]  # fmt: skip
      if writes:
        if not self._cache_batch:  # one insert transaction per loop pass, off the event loop
          self.loop.call_soon(self.flush_cache)
        self._cache_batch.extend(writes)
    for (item, index), s in zip(slots, samples):
      if s is not None:
        self._fill(jobs[item], index, s)

  def flush_cache(self) -> concurrent.futures.Future | None:
    if self._cache_batch:
      batch, self._cache_batch = self._cache_batch, []
      return self._writer.submit(self.cache.put_many, batch)
    return None

  def wait_for_writes(self) -> None:
    """Blocks (caller thread) until every queued cache write landed."""
    self._writer.submit(lambda: None).result()

  @staticmethod
  def _failed(call: HttpCall, reason: str) -> list[Sample]:
    return [failure(reason, call.mode)] * len(call.slots)

  # --------------------------------------------------------------------------- one attempt

  async def _attempt(self, flight: HttpCall) -> None:
    """Sends `flight` once; then finishes it, or schedules its retry after a backoff."""
    if self.halt:
      return self._finish(flight, self._failed(flight, self.halt), flight.verdict)
    await self.gate.wait(self.loop)  # a shared pause after 429s
    cost = 0.0
    if self.budget.capped:
      # The worst case, so that the settled spend can never pass the cap.
      cost = flight.max_tokens_in * self.price_in + flight.max_tokens_out * self.price_out
      if not await self.budget.reserve(cost, lambda: self.halt is not None):
        self._halt("budget", self.budget.exhausted_reason())
        return self._finish(flight, self._failed(flight, self.halt), flight.verdict)
    try:
      verdict, samples = await self._send_once(flight)
    finally:
      if self.budget.capped:
        await self.budget.release(cost)
    if self.redactor:
      verdict.reason = self.redactor.scrub(verdict.reason)
    if samples is not None:
      if flight.attempt < self.max_retries and flight.jobs is not None:
        if any(s.error is not None for s in samples):
          self._retry_missing(flight, samples)
      return self._finish(flight, samples, verdict)
    self._on_failed_attempt(flight, verdict)

  async def _send_once(self, call: HttpCall) -> tuple[Verdict, list[Sample] | None]:
    """(verdict, samples): samples are parsed (and accounted) only for an "ok" answer."""
    if self.rates.active:
      await self.rates.acquire(call.est_tokens_in, call.max_tokens_out)
    stats = self.stats
    stats.requests += 1
    self.totals["requests"] += 1
    if call.attempt:
      stats.retries += 1
    t0 = time.perf_counter()
    call.first_t = call.first_t or t0
    try:
      if self._send is not None:  # an in-process backend (`local`): same protocol, no HTTP
        status, headers, raw = await self._send(call, call.data)
      else:
        async with self._session.post(self.backend.base_url + call.path, data=call.data) as resp:
          raw = await resp.read()
        status, headers = resp.status, resp.headers
      verdict = self.backend.classify(status, headers, raw)
    except TimeoutError:
      stats.timeouts += 1
      return Verdict("retry", f"timeout: no full answer within timeout_s={self.timeout_s}"), None
    except (aiohttp.ClientError, OSError) as e:
      return Verdict("retry", f"connection error: {type(e).__name__}: {e}"), None
    if verdict.kind != "ok":
      return verdict, None
    try:
      samples = self.backend.parse(call, verdict.body)
    except (MalformedResponse, AttributeError, TypeError, KeyError, ValueError) as e:
      return Verdict("retry", f"malformed answer: {e}"), None
    self._account(call, samples, time.perf_counter() - call.first_t)
    return verdict, samples

  def _on_failed_attempt(self, flight: HttpCall, verdict: Verdict) -> None:
    """Halt, fail, split or retry a call whose attempt brought no samples."""
    flight.verdict = verdict
    if verdict.rate_limited:
      if verdict.status == 429:
        self.stats.n429 += 1
      else:
        self.stats.overloaded += 1
      if self.gate.on_rate_limited(self.loop.time(), verdict.retry_after_s):
        self.stats.pauses += 1
    if verdict.kind == "halt":
      if not (flight.waiter is not None and verdict.capability):
        self._halt(halt_kind(verdict.status, verdict.capability), verdict.reason)
      return self._finish(flight, self._failed(flight, verdict.reason), verdict)
    if verdict.kind == "fatal":
      return self._on_fatal(flight, verdict)
    if flight.attempt >= self.max_retries:
      reason = f"gave up after {flight.attempt + 1} attempts; last: {verdict.reason}"
      self._failed_in_a_row += 1
      if self.halt_after_failed_calls and self._failed_in_a_row >= self.halt_after_failed_calls:
        self._halt(
          "unreachable", f"{self._failed_in_a_row} teacher calls in a row failed; {reason}"
        )
      return self._finish(flight, self._failed(flight, reason), verdict)
    flight.attempt += 1
    # The worker moves on; the retry re-enters the queue after its backoff.
    delay = self.backoff.delay(flight.attempt - 1, verdict.retry_after_s)
    self.loop.call_later(delay, self.enqueue, [flight])

  def _on_fatal(self, flight: HttpCall, verdict: Verdict) -> None:
    items = {}
    for item, index in flight.slots:
      items.setdefault(item, []).append(index)
    if len(items) > 1 and flight.jobs is not None:
      # One bad prompt (say, too long) fails a packed call: retry its prompts one per call.
      runs = [(item, flight.jobs[item].request, idxs) for item, idxs in items.items()]
      calls = self.backend.pack(runs, prompts_per_request=1)
      for c in calls:
        c.jobs, c.attempt = flight.jobs, flight.attempt
      return self.enqueue(calls)
    return self._finish(flight, self._failed(flight, verdict.reason), verdict)

  def _retry_missing(self, flight: HttpCall, samples: list[Sample]) -> None:
    """Asks again for the samples a (truncated or proxied) answer left out; the rest stand. The
    same call is sent again (same prompts, n and seed), so the missing slots get the draws the
    first answer should have held; its other slots are already filled and ignored."""
    missing = False
    for j, s in enumerate(samples):
      if not s.ok and not s.empty and s.error.endswith(MISSING):
        samples[j] = None  # _fill skips it; the retry fills it
        missing = True
    if missing:
      flight.attempt += 1
      self.loop.call_later(self.backoff.delay(flight.attempt - 1, None), self.enqueue, [flight])

  def _account(self, call: HttpCall, samples: list[Sample], latency: float) -> None:
    if len(samples) == 1:
      t_in, t_out = samples[0].tokens_in, samples[0].tokens_out
    else:
      t_in = t_out = 0
      for s in samples:
        t_in += s.tokens_in
        t_out += s.tokens_out
    cost = t_in * self.price_in + t_out * self.price_out
    st, tot = self.stats, self.totals
    st.tokens_in += t_in
    st.tokens_out += t_out
    st.cost_usd += cost
    st.latencies.append(latency)
    tot["tokens_in"] += t_in
    tot["tokens_out"] += t_out
    tot["cost_usd"] += cost
    tot["samples"] += len(samples)
    self.budget.charge(cost)
    self.gate.on_success()
    self._failed_in_a_row = 0
    if self.rates.active:  # reconcile the up-front estimates with the reported usage
      self.rates.reconcile(call.est_tokens_in, call.max_tokens_out, t_in, t_out)

  # ------------------------------------------------------------------- probe, metrics, close

  async def probe_once(self, req: TeacherRequest):
    flight = self.backend.pack([(0, req, range(req.num_samples))])[0]
    flight.waiter = self.loop.create_future()
    self.enqueue([flight])
    return await flight.waiter

  async def snapshot(self, reset: bool, approximate: bool) -> dict[str, float]:
    s = self.stats
    if reset:
      self.stats = Stats()
    lat = np.asarray(s.latencies, np.float64)
    p50, p95 = np.percentile(lat, [50, 95]) if lat.size else (0.0, 0.0)
    return {
      "teacher/requests": s.requests, "teacher/retries": s.retries, "teacher/429s": s.n429,
      "teacher/overloaded": s.overloaded, "teacher/timeouts": s.timeouts, "teacher/pauses": s.pauses,
      "teacher/latency_p50_s": float(p50), "teacher/latency_p95_s": float(p95),
      "teacher/tokens_in": s.tokens_in, "teacher/tokens_out": s.tokens_out,
      "teacher/cost_usd": s.cost_usd, "teacher/cost_usd_total": self.totals["cost_usd"],
      "teacher/samples_ok": s.samples_ok, "teacher/samples_failed": s.samples_failed,
      "teacher/samples_empty": s.samples_empty,
      "teacher/cache_hits": s.cache_hits, "teacher/approximate": float(approximate),
      "teacher/pending_forks": len(self.pending),
    }  # fmt: skip

  async def totals_copy(self) -> dict:
    return dict(self.totals)

  async def load_totals(self, state) -> None:
    """Totals from a checkpoint, plus what this process spent before (the probe, say): a resumed
    run's budget sees both, whichever of probe and load came first."""
    for k, total in self.totals.items():
      own = total - self._loaded[k]
      if k in state:
        self._loaded[k] = type(total)(state[k])
      self.totals[k] = self._loaded[k] + own
    self.budget.spent_usd = self.totals["cost_usd"]

  async def shutdown(self) -> None:
    self._queue.clear()
    for t in list(self._tasks):
      t.cancel()
    await asyncio.gather(*self._tasks, return_exceptions=True)
    for job in list(self.pending):
      for i, s in enumerate(job.samples):
        if s is None:
          self._fill(
            job, i, failure("client closed before the teacher answered", self.backend.mode)
          )
    self.flush_cache()
    await self._session.close()

  def close_writer(self) -> None:
    self._writer.shutdown(wait=True)  # every cache write lands before close() returns
    if self.cache is not None:
      self.cache.close()


def _any_unfilled(runs, jobs: list[Job]) -> bool:
  return any(jobs[item].samples[i] is None for item, _, idxs in runs for i in idxs)
