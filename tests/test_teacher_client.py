"""TeacherClient against fake teacher servers on 127.0.0.1: futures, retries and fault handling,
fail-fast, budget cap, disk cache, pacing, 429 storms, metrics and state."""

import collections
import concurrent.futures
import json
import os
import sys
import threading
import time

import ml_collections
import pytest

from omniopd_jax.teacher import backends as tb
from omniopd_jax.teacher import client as tc
from omniopd_jax.teacher import futures, pacing

sys.path.insert(0, os.path.dirname(__file__))
import fake_teacher_servers as fts  # noqa: E402

FAST = dict(
  backoff_base_s=0.001, backoff_cap_s=0.01, storm_pause_s=0.01, timeout_s=5.0, max_tokens=8
)


@pytest.fixture
def teacher():
  return fts.FakeTeacher(hang_s=1.6, slow_s=0.05, retry_after_ms=150)


@pytest.fixture
def server(teacher):
  with fts.ServerThread(teacher) as srv:
    yield srv


def client_for(server, **kw):
  cfg = dict(backend="openai_completions", base_url=server.url(), model="m", **FAST)
  cfg.update(kw)
  return tc.TeacherClient.from_config(cfg)


def forks(n, samples=2, script="", tag="p"):
  """Requests whose prefix carries a fault script for the fake server."""
  return [
    tc.TeacherRequest(
      key=f"{tag}{i}", prefix_text=f"{tag} {i} {script}".strip() + " =", num_samples=samples, seed=i
    )
    for i in range(n)
  ]


def test_futures_resolve_per_request_and_early(server):
  with client_for(server, prompts_per_request=1) as client:
    slow, *fast = forks(5, script="[[fault:timeout]]", tag="s")[:1] + forks(4, tag="f")
    futures = client.submit([slow, *fast])
    concurrent.futures.wait(futures[1:], timeout=10)
    assert all(f.done() for f in futures[1:]) and not futures[0].done()  # early ones are usable
    for f in futures:
      samples = f.result(timeout=10)
      assert len(samples) == 2 and all(isinstance(s, tb.Sample) and s.ok for s in samples)
  assert "s 0" in slow.prefix_text


def test_scripted_faults_retried_and_billed_once(server, teacher):
  price = dict(price_in_per_mtok=2e6, price_out_per_mtok=5e6)  # $2 / $5 per token: easy sums
  scripts = [
    "[[fault:429ms,500]]",
    "[[fault:529,reset,malformed]]",
    "[[fault:error200,503,slow]]",
    "",
    "[[fault:timeout]]",
  ]
  reqs = [r for i, s in enumerate(scripts) for r in forks(1, 3, s, tag=f"t{i}")]
  with client_for(server, prompts_per_request=1, timeout_s=1.0, **price) as client:
    results = client.generate(reqs, timeout=30)
    m = client.metrics()
    state = client.state_dict()
  assert all(s.ok for samples in results for s in samples)
  assert m["teacher/requests"] == len(teacher.log) == 3 + 4 + 3 + 1 + 2  # "slow" is answered
  assert m["teacher/retries"] == 8 and m["teacher/429s"] == 1 and m["teacher/overloaded"] == 1
  assert m["teacher/timeouts"] == 1
  billed = teacher.billed
  assert billed["ok"] == 5  # one billed answer per call: nothing billed twice
  assert (m["teacher/tokens_in"], m["teacher/tokens_out"]) == (
    billed["tokens_in"],
    billed["tokens_out"],
  )
  assert m["teacher/cost_usd"] == pytest.approx(2 * billed["tokens_in"] + 5 * billed["tokens_out"])
  assert state["cost_usd"] == pytest.approx(m["teacher/cost_usd"])
  assert sum(s.tokens_in * 2 + s.tokens_out * 5 for r in results for s in r) == pytest.approx(
    m["teacher/cost_usd"]
  )
  assert 0 < m["teacher/latency_p50_s"] <= m["teacher/latency_p95_s"]


def test_random_fault_mix_loses_nothing(server, teacher):
  teacher.fault_rate, teacher.seed, teacher.hang_s = 0.35, 3, 1.5
  reqs = forks(30, 3, tag="r")
  with client_for(
    server, max_retries=2, timeout_s=1.0, max_in_flight=16, prompts_per_request=2
  ) as client:
    results = client.generate(reqs, timeout=60)
    m = client.metrics()
  flat = [s for r in results for s in r]
  assert len(flat) == 90 and all(len(r) == 3 for r in results)
  failed = [s for s in flat if not s.ok]
  assert all(
    s.text is None and s.error.startswith("gave up after 3 attempts; last:") for s in failed
  )
  assert all(s.ok == (s.error is None) and (s.text or not s.ok) for s in flat)  # never a silent ""
  assert (
    m["teacher/samples_ok"] + m["teacher/samples_failed"] == 90 and m["teacher/samples_ok"] > 45
  )
  assert m["teacher/requests"] == len(teacher.log) and m["teacher/retries"] > 0
  assert m["teacher/tokens_in"] == teacher.billed["tokens_in"] > 0
  assert m["teacher/tokens_out"] == teacher.billed["tokens_out"]
  faults = collections.Counter(e["fault"] for e in teacher.log if e["fault"])
  assert len(faults) >= 6  # the mix really was mixed


def test_partial_answer_asks_again_for_missing_samples(server, teacher):
  with client_for(server, price_in_per_mtok=1e6, price_out_per_mtok=1e6) as client:
    (samples,) = client.generate(forks(1, 3, "[[fault:partial]]"), timeout=10)
    m = client.metrics()
  assert all(s.ok for s in samples) and len({s.text for s in samples}) == 3
  bodies = [json.loads(e["body"]) for e in teacher.log]
  # The same call again (n, seed): the left-out slot gets the draw it would have held.
  assert [b["n"] for b in bodies] == [3, 3] and bodies[0] == bodies[1]
  assert m["teacher/retries"] == 1
  assert m["teacher/cost_usd"] == pytest.approx(
    teacher.billed["tokens_in"] + teacher.billed["tokens_out"]
  )


def test_auth_error_fails_fast(server, teacher):
  teacher.api_key = "right"
  os.environ["WRONG_TEACHER_KEY"] = "wrong"
  with client_for(server, api_key_env="WRONG_TEACHER_KEY", max_in_flight=1) as client:
    results = client.generate(forks(6, 2), timeout=10)
    later = client.generate(forks(2, 2, tag="later"), timeout=10)
    m = client.metrics()
    assert "not authorised" in client.halted
  assert all(not s.ok and "not authorised" in s.error for r in results + later for s in r)
  assert m["teacher/requests"] == len(teacher.log) == 1 and m["teacher/retries"] == 0


def test_bad_request_fails_only_its_prompt(server, teacher):
  with client_for(server) as client:  # all four forks packed into one call
    bad, *good = forks(1, 2, "[[fault:400]]", tag="b") + forks(3, 2, tag="g")
    results = client.generate([bad, *good], timeout=10)
    assert client.halted is None and client.metrics()["teacher/retries"] == 0
  assert all(not s.ok and "HTTP 400" in s.error and "too long" in s.error for s in results[0])
  assert all(s.ok for r in results[1:] for s in r)
  assert len(teacher.log) == 1 + 4  # the packed call, then one call per prompt


def test_spend_limit_halts(server):
  with client_for(server, prompts_per_request=1, max_in_flight=1) as client:
    results = client.generate(forks(1, 1, "[[fault:spend]]", tag="x") + forks(2, 1), timeout=10)
  assert all("spend limit" in s.error for r in results for s in r)


def test_budget_cap_stops_cleanly(server, teacher):
  # Each call reserves its worst case at $0.1/token (~14 input tokens, max 8 output tokens).
  price = dict(price_in_per_mtok=1e5, price_out_per_mtok=1e5, budget_usd=5.0)
  with client_for(server, prompts_per_request=1, max_in_flight=4, **price) as client:
    results = client.generate(forks(20, 1), timeout=10)
    assert client.budget_exhausted and "budget cap" in client.halted
    spent = client.state_dict()["cost_usd"]
  ok = [s for r in results for s in r if s.ok]
  assert 0 < len(ok) < 20 and len(ok) == teacher.billed["ok"] == len(teacher.log)
  assert spent <= 5.0 and spent == pytest.approx(
    0.1 * (teacher.billed["tokens_in"] + teacher.billed["tokens_out"])
  )
  assert all("budget cap" in s.error for r in results for s in r if not s.ok)


def test_budget_is_a_hard_cap_when_the_api_bills_the_worst_case():
  # $0.1 a token; each prompt ~200 characters, billed one token a byte, and max_tokens out.
  teacher = fts.FakeTeacher(bill_worst_case=True)
  prompts = [
    tc.TeacherRequest(key=f"f{i}", prefix_text=f"{i} " + "x" * (150 + 10 * i)) for i in range(30)
  ]
  price = dict(price_in_per_mtok=1e5, price_out_per_mtok=1e5, budget_usd=200.0)
  with fts.ServerThread(teacher) as srv:
    with client_for(srv, prompts_per_request=1, max_in_flight=8, **price) as client:
      results = client.generate(prompts, timeout=30)
      spent = client.state_dict()["cost_usd"]
      assert client.budget_exhausted
  ok = sum(s.ok for r in results for s in r)
  billed = 0.1 * (teacher.billed["tokens_in"] + teacher.billed["tokens_out"])
  assert 0 < ok < 30 and spent == pytest.approx(billed) and spent <= 200.0


def test_the_probe_is_budgeted_and_counted(server, teacher):
  price = dict(price_in_per_mtok=1e5, price_out_per_mtok=1e5, budget_usd=50.0)
  with client_for(server, **price) as client:
    client.load_state_dict({"cost_usd": 50.0})  # a resumed run whose budget is spent
    with pytest.raises(tc.TeacherHalted, match="budget"):
      client.probe(timeout=10)
  assert len(teacher.log) == 0  # checked before anything was sent
  with client_for(server, **price) as client:
    client.probe(timeout=10)
    probe_cost = client.state_dict()["cost_usd"]
    client.load_state_dict({"cost_usd": 10.0})  # the checkpoint's spend, loaded after the probe
    assert probe_cost > 0 and client.state_dict()["cost_usd"] == pytest.approx(10.0 + probe_cost)


def test_disk_cache_per_sample_and_reruns_free(server, teacher, tmp_path):
  price = dict(price_in_per_mtok=1e6, price_out_per_mtok=1e6)
  with client_for(server, cache_dir=str(tmp_path), **price) as client:
    first = client.generate(forks(3, 4), timeout=10)
    m1 = client.metrics()
  n_log = len(teacher.log)
  with client_for(server, cache_dir=str(tmp_path), **price) as client:  # a rerun (new process)
    again = client.generate(forks(3, 4), timeout=10)
    m2 = client.metrics()
    wider = client.generate(forks(3, 6), timeout=10)  # 2 more samples: only those are sent
    other_seed = client.generate(
      [tc.TeacherRequest(key="z", prefix_text="p 0 =", num_samples=4, seed=99)]
    )
  assert [[s.text for s in r] for r in again] == [[s.text for s in r] for r in first]
  assert all(s.from_cache for r in again for s in r) and not any(
    s.from_cache for r in first for s in r
  )
  assert all(len({s.text for s in r}) == 4 for r in first)  # two samples never share an entry
  assert (
    m2["teacher/requests"] == 0 and m2["teacher/cost_usd"] == 0 and m2["teacher/cache_hits"] == 12
  )
  assert m1["teacher/cost_usd"] > 0
  assert [[s.from_cache for s in r] for r in wider] == [[True] * 4 + [False] * 2] * 3
  assert not any(s.from_cache for s in other_seed[0])
  assert len(teacher.log) > n_log


def test_retry_after_is_honoured(server, teacher):
  with client_for(server) as client:
    (samples,) = client.generate(forks(1, 1, "[[fault:429ms]]"), timeout=10)
  assert samples[0].ok
  t = [e["t"] for e in teacher.log]
  assert len(t) == 2 and t[1] - t[0] >= 0.15  # retry-after-ms: 150


def test_429_storm_pauses_all_traffic(server, teacher):
  opts = dict(
    storm_threshold=4, storm_window_s=5.0, storm_pause_s=0.3, backoff_cap_s=1.0, max_in_flight=8
  )
  opts["prompts_per_request"] = 1
  with client_for(server, **opts) as client:
    results = client.generate(forks(8, 1, "[[fault:429bare]]"), timeout=10)
    m = client.metrics()
  assert all(s.ok for r in results for s in r)
  assert m["teacher/pauses"] >= 1 and m["teacher/429s"] == 8
  first = [e["t"] for e in teacher.log if e["fault"]]
  retries = [e["t"] for e in teacher.log if not e["fault"]]
  assert len(first) == len(retries) == 8
  t = sorted(first + retries)
  assert max(b - a for a, b in zip(t, t[1:])) >= 0.28  # a silent pause (backoffs alone are ~ms)


def test_token_bucket_pacing():
  now = [0.0]
  b = pacing.TokenBucket(per_minute=600, burst_s=1.0, clock=lambda: now[0])  # 10/s, holds 10
  assert b.delay(10) == 0
  b.take(10)
  assert b.delay(1) == pytest.approx(0.1)
  now[0] = 0.5
  assert b.delay(5) == 0 and b.delay(6) == pytest.approx(0.1)
  b.take(5)
  now[0] = 10.0
  assert b.delay(50) == 0  # bigger than the bucket: allowed once full, leaving debt
  b.take(50)
  assert b.delay(1) == pytest.approx(4.1)
  b.refund(45)  # the reported usage was lower than reserved
  assert b.delay(1) == 0


def test_rpm_paces_real_requests(server, teacher):
  with client_for(
    server, rpm=1200, rate_burst_s=0.05, prompts_per_request=1
  ) as client:  # 20/s, burst 1
    client.generate(forks(6, 1), timeout=10)
  t = sorted(e["t"] for e in teacher.log)
  assert t[-1] - t[0] >= 0.2  # 5 gaps of 50 ms


def test_close_resolves_pending_as_failures(server):
  client = client_for(server, timeout_s=5.0)
  futures = client.submit(forks(2, 2, "[[fault:timeout]]"))
  time.sleep(0.1)
  client.close()
  for f in futures:
    samples = f.result(timeout=1)
    assert len(samples) == 2 and all("client closed" in s.error for s in samples)
  with pytest.raises(RuntimeError, match="close"):
    client.submit(forks(1))
  with pytest.raises(RuntimeError, match="closed"):
    client.metrics()
  assert client.state_dict()["requests"] >= 1
  client.close()  # idempotent


def test_metrics_reset_and_state_dict(server):
  cfg = ml_collections.ConfigDict(
    dict(
      backend="openai_completions", base_url=server.url(), model="m", price_in_per_mtok=1e6, **FAST
    )
  )
  with tc.TeacherClient.from_config(cfg) as client:
    client.generate(forks(2, 2))
    m = client.metrics(reset=True)
    assert m["teacher/requests"] >= 1 and m["teacher/cost_usd"] > 0
    assert (
      client.metrics()["teacher/requests"] == 0 and client.metrics()["teacher/cost_usd_total"] > 0
    )
    state = client.state_dict()
  assert set(state) >= {"cost_usd", "tokens_in", "tokens_out"}
  cfg.budget_usd = state["cost_usd"]
  with tc.TeacherClient.from_config(cfg) as resumed:
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    (samples,) = resumed.generate(
      forks(1, 1, tag="after")
    )  # the restored spend counts toward the cap
    assert "budget cap" in samples[0].error


def test_config_and_input_errors(server):
  with pytest.raises(ValueError, match="unknown teacher config"):
    client_for(server, max_inflight=3)
  os.environ.pop("NO_SUCH_TEACHER_KEY", None)
  with pytest.raises(ValueError, match="NO_SUCH_TEACHER_KEY"):
    client_for(server, api_key_env="NO_SUCH_TEACHER_KEY")
  os.environ["SECRET_TEACHER_KEY"] = "sk-very-secret"
  with client_for(server, api_key_env="SECRET_TEACHER_KEY") as client:
    assert "sk-very-secret" not in repr(client) and "sk-very-secret" not in repr(client.backend)
    with pytest.raises(ValueError, match="num_samples"):
      client.submit([tc.TeacherRequest(key="z", prefix_text="x", num_samples=0)])
    with pytest.raises(ValueError, match="prefix"):
      client.submit([tc.TeacherRequest(key="z")])


def test_in_process_backend_hook():
  @tb.register_backend
  class Echo(tb.OpenAICompletions):
    """A backend without HTTP, as the `local` sampler backend plugs in."""

    name = "echo_test"

    async def send(self, call, data):
      if b"[[fault:500]]" in data and not getattr(self, "failed_once", False):
        self.failed_once = True
        return 500, {}, b'{"error": {"message": "sampler busy"}}'
      n = call.n
      prompts = (
        call.payload["prompt"]
        if isinstance(call.payload["prompt"], list)
        else [call.payload["prompt"]]
      )
      choices = [
        {"index": i, "text": f" echo{i % n}", "finish_reason": "length"}
        for i in range(len(prompts) * n)
      ]
      return (
        200,
        {},
        json.dumps(
          {"choices": choices, "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
        ).encode(),
      )

  client = tc.TeacherClient.from_config(
    dict(backend="echo_test", base_url="http://unused", model="m", **FAST)
  )
  with client:
    results = client.generate(forks(3, 2, "[[fault:500]]"), timeout=10)
    m = client.metrics()
  assert [[s.text for s in r] for r in results] == [[" echo0", " echo1"]] * 3
  assert m["teacher/retries"] == 1 and m["teacher/tokens_out"] == 2


def test_cancelled_futures_are_marked_for_waiters():
  a, c = futures.new_future(), futures.new_future()
  threading.Timer(0.02, lambda: futures.resolve(a, "a")).start()
  assert a.result(timeout=5) == "a"
  assert c.cancel()
  futures.resolve(c, "late")  # the client delivers into a future its caller cancelled
  with pytest.raises(concurrent.futures.CancelledError):
    c.result()
  done, not_done = concurrent.futures.wait([a, c], timeout=1)
  assert len(done) == 2 and not not_done
