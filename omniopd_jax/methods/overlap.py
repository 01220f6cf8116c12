"""Overlap with the teacher (rollout.overlap_teacher): a rollout row's forks are chosen and its
teacher requests sent as soon as that row ends, so teacher latency hides behind the rest of the
decode instead of following it.

The continuous engine reports each finished row (`sampler.generate(on_row_done=...)`); a
`RowSubmitter` is that callback. Everything it builds equals what the whole-batch path builds
after the decode, bit for bit: a row's forks depend on its own entropies only
(`forks.select_row_forks`), its requests are those `chunks.build_fork_requests` makes for it, and
`finish()` returns them in the same (row, slot) order, so scoring (in request order) and exact
resume are unchanged. Only the moment each request leaves differs:

  prompts_per_request = 1   each row's requests go out as the row ends, in any row order;
  prompts_per_request = P   packed calls take their seed from their first prompt, so requests
                            leave in row order, P at a time (a row waits for the rows before it):
                            the client packs exactly the calls of one whole-batch submission.

`wait_and_score` overlaps the other way: it scores requests that came back while later ones are
still out (for scorers whose values do not depend on their batch).
"""

import concurrent.futures
import time
from collections.abc import Callable

import jax
import numpy as np

from omniopd_jax.methods import base
from omniopd_jax.rollout import chunks, forks

POLL_S = 0.25  # how often a teacher wait looks at the stop flag


def prompts_per_call(teacher) -> int:
  """Forks the teacher client packs into one HTTP call (its backend's prompts_per_request)."""
  return max(1, int(teacher.backend.caps.prompts_per_request))


def track_arrivals(futures, arrivals: list[float]) -> None:
  """Appends each future's arrival time (perf_counter) to `arrivals` as it resolves."""
  for f in futures:
    f.add_done_callback(lambda _: arrivals.append(time.perf_counter()))


class RowSubmitter:
  """The `on_row_done` callback of an overlapped OmniOPD collection; `finish()` after the decode.

  Args:
    teacher: the TeacherClient (submit, backend.caps).
    tokenizer: the student's tokenizer.
    prompts: this step's prompt id lists (one rollout row each).
    requests_fn: ForkRequests -> their TeacherRequests (omniopd.teacher_requests).
    num_forks, chunk_len, fork_method, rng: as for forks.select_forks.
    length: the rollout's max_new_tokens (L of the [B, L] arrays the batch path sees).
  """

  def __init__(self, teacher, tokenizer, prompts, requests_fn: Callable, *, num_forks: int,
               chunk_len: int, fork_method: str, rng, length: int):  # fmt: skip
    self.teacher, self.tokenizer, self.prompts = teacher, tokenizer, prompts
    self.requests_fn = requests_fn
    self.fork_args = dict(num_rows=len(prompts), num_forks=num_forks, chunk_len=chunk_len,
                          method=fork_method, rng=rng)  # fmt: skip
    self.chunk_len, self.length = chunk_len, length
    n = len(prompts)
    self.forks: list = [None] * n  # (starts [M], valid [M]) per row
    self.reqs: list = [None] * n  # chunks.ForkRequests per row
    self.requests: list = [None] * n  # TeacherRequests per row
    self.futures: list = [None] * n  # one future per request, per row
    self.ppr = prompts_per_call(teacher)
    self.next_row = 0  # packed calls: rows before this one are queued or sent
    self.queue: list[tuple[int, int]] = []  # packed calls: (row, request) not yet sent
    self.arrivals: list[float] = []  # first submission time, then each arrival (teacher_span)
    self.rows_done_at: list[float] = []  # perf_counter when each row was reported (diagnostics)

  def __call__(self, row: int, tokens, logprobs, entropy) -> None:
    """A rollout row ended: tokens/logprobs/entropy [n] are its generated tokens."""
    del logprobs
    self.rows_done_at.append(time.perf_counter())
    if self.reqs[row] is not None:
      raise RuntimeError(f"rollout row {row} reported twice")
    n = len(tokens)
    ids = np.zeros(self.length, np.int32)
    ids[:n] = tokens
    ent = np.zeros(self.length, np.float32)
    ent[:n] = entropy
    mask = np.arange(self.length) < n  # [L]
    starts, valid = jax.device_get(
      forks.select_row_forks(ent, mask, np.int32(row), **self.fork_args)
    )  # [M] each
    self.forks[row] = (starts, valid)
    self.reqs[row] = chunks.build_row_requests(
      self.tokenizer, self.prompts[row], ids, mask, starts, valid, row=row,
      num_rows=len(self.prompts), chunk_len=self.chunk_len,
    )  # fmt: skip
    self.requests[row] = self.requests_fn(self.reqs[row])
    self.futures[row] = [None] * len(self.requests[row])
    if self.ppr == 1:
      self._submit([(row, i) for i in range(len(self.requests[row]))])
      return
    while self.next_row < len(self.prompts) and self.requests[self.next_row] is not None:
      self.queue += [(self.next_row, i) for i in range(len(self.requests[self.next_row]))]
      self.next_row += 1
    whole = len(self.queue) - len(self.queue) % self.ppr  # whole calls' worth, in row order
    self._submit(self.queue[:whole])
    self.queue = self.queue[whole:]

  def _submit(self, items: list[tuple[int, int]]) -> None:
    if not items:
      return
    if not self.arrivals:
      self.arrivals.append(time.perf_counter())
    futures = self.teacher.submit([self.requests[r][i] for r, i in items])
    for (r, i), f in zip(items, futures):
      self.futures[r][i] = f
    track_arrivals(futures, self.arrivals)

  def finish(self):
    """After the decode: sends what is left; returns (starts [B, M], valid [B, M], ForkRequests,
    boundary mismatches, futures in request order, arrivals) as the whole-batch path has them."""
    missing = [r for r, req in enumerate(self.reqs) if req is None]
    if missing:
      raise RuntimeError(f"rollout rows {missing[:5]} never reported their end (on_row_done)")
    self._submit(self.queue)
    self.queue = []
    if not self.arrivals:  # no fork anywhere: nothing was sent
      self.arrivals.append(time.perf_counter())
    starts = np.stack([s for s, _ in self.forks]).astype(np.int32)  # [B, M]
    valid = np.stack([v for _, v in self.forks]).astype(bool)  # [B, M]
    req = chunks.join_requests(self.reqs, valid.shape)
    futures = [f for row in self.futures for f in row]
    return starts, valid, req, int(req.boundary_mismatch.sum()), futures, self.arrivals


def wait_and_score(futures, student_texts, scorer, num_samples: int, clip=None, stop=None):
  """Scores completed requests in waves while later ones are still in flight.

  Waves follow the teacher's timing, so they are used only with a scorer whose values do not
  depend on which texts share a call (`batch_invariant`: edit, ROUGE-1, exact). An encoder's
  cosine moves by ~1e-7 with its batch's padding and size, so embedding phi scores every request
  in one call, in request order, once all have arrived: a resumed or repeated step then computes
  exactly the same similarities. `stop` (a threading.Event) cancels the wait: WaitCancelled
  within POLL_S of being set.

  Returns (sim [n, N] with NaN for failed samples, teacher texts n x N (None = failed),
  failure reasons, seconds waiting, seconds scoring).
  """
  n = len(futures)
  sim = np.full((n, num_samples), np.nan, np.float32)
  texts: list[list[str | None]] = [[None] * num_samples for _ in range(n)]
  reasons: list[list[str]] = [[] for _ in range(n)]  # in request order, whatever the timing
  pending = {f: i for i, f in enumerate(futures)}
  waves = bool(getattr(scorer, "batch_invariant", False))
  wait_s = score_s = 0.0
  while pending:
    t0 = time.perf_counter()
    concurrent.futures.wait(
      list(pending), timeout=POLL_S if stop is not None else None,
      return_when=concurrent.futures.FIRST_COMPLETED,
    )  # fmt: skip
    # Take everything finished by now as one wave: one batched encode per wave.
    done = [f for f in pending if f.done()]
    wait_s += time.perf_counter() - t0
    if stop is not None and stop.is_set():
      raise base.WaitCancelled(f"stopped with {len(pending)} teacher requests pending")
    if not done:
      continue
    idx = [pending.pop(f) for f in done]
    for i, f in zip(idx, done):
      samples = f.result()
      texts[i] = [s.text if s.ok else None for s in samples]
      if clip is not None:
        texts[i] = clip(texts[i])
      reasons[i] = [s.error for s in samples if not s.ok]
    if waves or not pending:
      idx = idx if waves else list(range(n))
      t0 = time.perf_counter()
      sim[idx] = scorer.score([student_texts[i] for i in idx], [texts[i] for i in idx])
      score_s += time.perf_counter() - t0
  return sim, texts, [r for rs in reasons for r in rs], wait_s, score_s
