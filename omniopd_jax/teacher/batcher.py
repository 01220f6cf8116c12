"""Batching for the local engine: concurrent jobs gathered into one `teacher.run` on a worker thread."""

import asyncio
import collections
import concurrent.futures
import queue
import threading

BATCH_WAIT_S = 0.005  # how long a request waits for others to share its sampler call


class Batcher:
  """Gathers concurrent jobs (arrivals within `wait_s`, up to `max_batch` rows) into one
  `teacher.run` on a single worker thread, so JAX work never blocks the event loop and runs one
  batch at a time. The gathering task lives only while jobs are pending."""

  def __init__(self, teacher, max_batch: int, wait_s: float = BATCH_WAIT_S):
    self.teacher, self.max_batch, self.wait_s = teacher, max_batch, wait_s
    self._pending: collections.deque = collections.deque()  # (job, future)
    self._task: asyncio.Task | None = None
    self._work: queue.Queue = queue.Queue()
    self.jobs_run = 0  # jobs handed to the engine (a cancelled one never is)
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
      # Jobs whose client went away (the request handler was cancelled) are dropped unrun.
      self._pending = collections.deque(p for p in self._pending if not p[1].cancelled())
      items, rows = [], 0
      while self._pending and (not items or rows + self._pending[0][0].rows <= self.max_batch):
        items.append(self._pending.popleft())
        rows += items[-1][0].rows
      if not items:
        break
      self.jobs_run += len(items)
      done = concurrent.futures.Future()
      self._work.put((self.teacher.run, ([job for job, _ in items],), done))
      try:
        results = await asyncio.wrap_future(done)
      except Exception as e:  # noqa: BLE001
        results = [e] * len(items)
      for (_, future), result in zip(items, results):
        if not future.done():  # the client may have gone away
          future.set_result(result)
