"""The teacher's disk cache: the teacher's draws in one SQLite file, keyed by request and sample
index, so that a re-run step reads back exactly the draws the first run got."""

import hashlib
import json
import logging
import os
import sqlite3

from omniopd_jax.teacher.wire import Sample, TeacherRequest

log = logging.getLogger(__name__)


class DiskCache:
  """The teacher's draws in one SQLite file (WAL), keyed by sha256(backend, model, mode, request,
  sample index). The sample index is part of the key: two samples of one prefix never share an
  entry, and a rerun of a step reads back the same N draws. Every draw is cached, empty answers
  included (Sample.empty); transport failures never are.

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
        error = d.get("error")  # set for an empty answer (Sample.empty)
        found[key] = Sample(d["text"], error, d["finish_reason"], None if ids is None else tuple(ids),
                            d["tokens_in"], d["tokens_out"], d["mode"], True, error is not None)  # fmt: skip
    return found

  def put_many(self, entries: list[tuple[bytes, Sample]]) -> None:
    rows = [
      (key, json.dumps({"text": s.text, "finish_reason": s.finish_reason, "tokens_in": s.tokens_in,
                        "tokens_out": s.tokens_out, "mode": s.mode, "error": s.error,
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
