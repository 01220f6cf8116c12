"""A halted client says so with a typed exception the train loop can raise: auth failure after
the probe, budget, and a teacher that went away (fail fast after calls in a row gave up)."""

import os
import sys
import time

import pytest

from omniopd_jax.teacher import client as tc

sys.path.insert(0, os.path.dirname(__file__))
import fake_teacher_servers as fts  # noqa: E402

FAST = dict(backoff_base_s=0.001, backoff_cap_s=0.01, timeout_s=5.0, max_tokens=8)


def forks(tag: str, k: int = 3):
  return [tc.TeacherRequest(key=f"{tag}{i}", prefix_text=f"{tag} {i} =", seed=i) for i in range(k)]


def client_for(url: str, **kw):
  cfg = dict(backend="openai_completions", base_url=url, model="m", prompts_per_request=1, **FAST)
  return tc.TeacherClient.from_config({**cfg, **kw})


def test_auth_failure_after_the_probe_halts_with_a_typed_exception():
  with fts.ServerThread(fts.FakeTeacher()) as srv, client_for(srv.url()) as client:
    client.probe(timeout=10)
    client.raise_if_halted()  # running: nothing to raise
    assert client.halt_error is None
    client.generate(forks("[[fault:401]]", 1), timeout=10)  # the key was revoked mid-run
    with pytest.raises(tc.TeacherHalted) as halted:
      client.raise_if_halted()
    (later,) = client.generate(forks("later", 1), timeout=10)
  assert halted.value.kind == "auth" and "HTTP 401" in str(halted.value)
  assert "not authorised" in halted.value.cause and later[0].error == halted.value.cause


def test_budget_halt_is_typed():
  price = dict(price_in_per_mtok=1e5, price_out_per_mtok=1e5, budget_usd=3.0)
  with fts.ServerThread(fts.FakeTeacher()) as srv, client_for(srv.url(), **price) as client:
    client.generate(forks("b", 10), timeout=10)
    assert client.budget_exhausted
    with pytest.raises(tc.TeacherHalted, match=r"\(budget\).*budget_usd=3.0"):
      client.raise_if_halted()
    with pytest.raises(tc.TeacherHalted) as probe:  # no probe past the budget either
      client.probe(timeout=10)
  assert probe.value.kind == "budget"


def test_a_teacher_that_went_away_halts_after_calls_in_a_row_gave_up():
  srv = fts.ServerThread(fts.FakeTeacher())
  client = client_for(srv.url(), max_retries=1, halt_after_failed_calls=3, max_in_flight=1)
  with client:
    client.probe(timeout=10)
    srv.close()  # the teacher server dies mid-run
    results = client.generate(forks("gone", 5), timeout=30)
    assert all(not s.ok for r in results for s in r)
    with pytest.raises(tc.TeacherHalted) as halted:
      client.raise_if_halted()
    t0 = time.perf_counter()
    (again,) = client.generate(forks("again", 1), timeout=10)
    assert time.perf_counter() - t0 < 1.0  # fails at once, no retries
  assert halted.value.kind == "unreachable" and "3 teacher calls in a row failed" in str(
    halted.value
  )
  assert "connection error" in halted.value.cause and again[0].error == halted.value.cause


def test_halt_from_a_signal_handler_ends_the_teacher_wait_at_once():
  teacher = fts.FakeTeacher(hang_s=5.0)
  with fts.ServerThread(teacher) as srv, client_for(srv.url(), timeout_s=4.0) as client:
    futures = client.submit(forks("[[fault:timeout,timeout,timeout]]", 4))  # a failing teacher
    time.sleep(0.2)
    t0 = time.perf_counter()
    client.halt("SIGTERM")  # only schedules: safe in a signal handler
    results = [f.result(timeout=2) for f in futures]
    waited = time.perf_counter() - t0
    with pytest.raises(tc.TeacherHalted) as halted:
      client.raise_if_halted()
  assert waited < 1.0 and all(s.error == "SIGTERM" for r in results for s in r)
  assert halted.value.kind == "stopped"
