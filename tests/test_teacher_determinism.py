"""A re-asked request gets exactly the draws the first ask got: empty continuations are draws
(cached, never asked again), and a call's prompts, n and seed depend only on what was submitted,
not on which samples happen to be cached (a step re-run after a kill, with its answers partly
cached). Against a fake seeded server on 127.0.0.1 whose draws are a pure function of the call."""

import os
import sqlite3
import sys

from omniopd_jax.teacher import client as tc

sys.path.insert(0, os.path.dirname(__file__))
import fake_teacher_servers as fts  # noqa: E402

FAST = dict(backoff_base_s=0.001, backoff_cap_s=0.01, timeout_s=5.0, max_tokens=8)


def step_requests():
  """One step's forks: packed 4 prompts a call, 4 samples each in blocks of 2."""
  return [
    tc.TeacherRequest(
      key=f"f{i}", prefix_text=f"fork {i} [[empties]] =", num_samples=4, seed=100 + i
    )
    for i in range(6)
  ]


def ask(cache_dir=None):
  """(outcomes per request, number of HTTP calls the server saw) from a fresh server."""
  teacher = fts.FakeTeacher(seeded=True)
  with fts.ServerThread(teacher) as srv:
    cfg = dict(backend="openai_completions", base_url=srv.url(), model="m", cache_dir=cache_dir)
    cfg.update(prompts_per_request=4, samples_per_request=2, **FAST)
    with tc.TeacherClient.from_config(cfg) as client:
      results = client.generate(step_requests(), timeout=30)
      client.flush()
      metrics = client.metrics()
  outcomes = [[(s.text, s.error, s.empty) for s in r] for r in results]
  return outcomes, len(teacher.log), metrics


def test_empty_continuations_are_draws_cached_like_any_sample(tmp_path):
  first, calls, m = ask(str(tmp_path))
  empties = [o for r in first for o in r if o[2]]
  assert empties and all(e[0] is None and "empty continuation" in e[1] for e in empties)
  assert m["teacher/samples_empty"] == len(empties) and m["teacher/samples_failed"] == 0
  for r in first:  # each block of a request has its own seed: no repeated draws
    texts = [t for t, _, _ in r if t]
    assert len(set(texts)) == len(texts)
  assert calls == 4  # per block of 2 samples, 6 forks in calls of 4 + 2 prompts
  again, calls_again, m_again = ask(str(tmp_path))
  assert again == first and calls_again == 0  # all from the cache, the empty draws included
  assert m_again["teacher/cache_hits"] == 24


def test_a_partly_cached_step_gets_exactly_the_first_draws(tmp_path):
  first, calls, _ = ask(str(tmp_path))
  assert ask(None)[0] == first  # the draws are a pure function of the submitted requests
  db = sqlite3.connect(os.path.join(tmp_path, "teacher_cache.sqlite"))
  keys = [k for (k,) in db.execute("SELECT key FROM samples ORDER BY key")]
  with db:  # a kill mid-step: some answers reached the cache, others did not
    db.executemany("DELETE FROM samples WHERE key = ?", [(k,) for k in keys[::20]])
  db.close()
  again, calls_again, m = ask(str(tmp_path))
  assert again == first
  assert 0 < calls_again < calls and m["teacher/cache_hits"] == len(keys) - len(keys[::20])
