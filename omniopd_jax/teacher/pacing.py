"""Pacing of teacher traffic: token buckets for rpm / input-tpm / output-tpm, the shared pause after
a storm of 429/529 answers, and full-jitter backoff that honours a server's Retry-After.

Everything here runs on the client's event-loop thread (no locks beyond asyncio's).
"""

import asyncio
import collections
import logging
import random
import time

log = logging.getLogger(__name__)


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


class RateLimits:
  """The three optional buckets (None: unpaced) a call passes before it is sent."""

  def __init__(self, rpm=None, input_tpm=None, output_tpm=None, burst_s: float = 10.0):
    self.rpm = TokenBucket(rpm, burst_s) if rpm else None
    self.input_tpm = TokenBucket(input_tpm, burst_s) if input_tpm else None
    self.output_tpm = TokenBucket(output_tpm, burst_s) if output_tpm else None
    self.active = bool(rpm or input_tpm or output_tpm)

  async def acquire(self, tokens_in: int, max_tokens_out: int) -> None:
    if self.rpm:
      await self.rpm.acquire(1)
    if self.input_tpm:
      await self.input_tpm.acquire(tokens_in)
    if self.output_tpm:
      await self.output_tpm.acquire(max_tokens_out)

  def reconcile(self, est_in: int, max_out: int, used_in: int, used_out: int) -> None:
    """Gives back what the up-front estimates took beyond the reported usage."""
    if self.input_tpm:
      self.input_tpm.refund(est_in - used_in)
    if self.output_tpm:
      self.output_tpm.refund(max_out - used_out)


class RateLimitGate:
  """A pause shared by every call: Retry-After of any 429/529 holds all traffic, and a storm
  (`threshold` of them within `window_s`) pauses everything for `pause_s`, doubling per storm in a
  row (reset by any success) up to `cap_s`."""

  def __init__(self, threshold: int, window_s: float, pause_s: float, cap_s: float, max_wait_s):
    self.threshold, self.window_s, self.pause_s = threshold, window_s, pause_s
    self.cap_s, self.max_wait_s = cap_s, max_wait_s
    self.until = 0.0
    self.storms = 0
    self._recent: collections.deque = collections.deque()

  async def wait(self, loop: asyncio.AbstractEventLoop) -> None:
    while self.until and (left := self.until - loop.time()) > 0:
      await asyncio.sleep(left)

  def on_rate_limited(self, now: float, retry_after_s: float | None) -> bool:
    """Records one 429/529 at loop time `now`; True when it started a storm pause."""
    if retry_after_s is not None:
      self.until = max(self.until, now + min(retry_after_s, self.max_wait_s))
    recent = self._recent
    recent.append(now)
    while recent and recent[0] < now - self.window_s:
      recent.popleft()
    if len(recent) < self.threshold:
      return False
    pause = min(self.cap_s, self.pause_s * 2**self.storms)
    self.storms += 1
    recent.clear()
    self.until = max(self.until, now + pause)
    log.warning("teacher: 429/529 storm, pausing all requests for %.2fs", pause)
    return True

  def on_success(self) -> None:
    self.storms = 0


class Backoff:
  """Full jitter: sleep U(0, min(cap, base * 2**attempt)); a server's Retry-After (capped at
  `max_wait_s`) plus U(0, base) when it named one."""

  def __init__(
    self, base_s: float, cap_s: float, max_wait_s: float, rng: random.Random | None = None
  ):
    self.base_s, self.cap_s, self.max_wait_s = base_s, cap_s, max_wait_s
    self._rng = rng or random.Random()

  def delay(self, attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
      return min(retry_after, self.max_wait_s) + self._rng.uniform(0, self.base_s)
    return self._rng.uniform(0, min(self.cap_s, self.base_s * 2**attempt))
