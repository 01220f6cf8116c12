"""The client never hands out its key: a gateway on 127.0.0.1 that echoes the credentials it got
in every error body, against failures, halts, the probe, logs and metrics."""

import logging
import os
import sys

import pytest

from omniopd_jax.teacher import client as tc
from omniopd_jax.teacher import secrets

sys.path.insert(0, os.path.dirname(__file__))
import fake_teacher_servers as fts  # noqa: E402

KEY = "sk-live-0123456789abcdef"
FAST = dict(backoff_base_s=0.001, backoff_cap_s=0.01, timeout_s=5.0, max_tokens=8, max_retries=1)
PREFIX = {
  "openai_completions": "/v1",
  "openai_chat": "/v1",
  "anthropic": "/v1",
  "gemini": "/v1beta",
}


def forks(tag: str, k: int = 2):
  return [
    tc.TeacherRequest(
      key=f"f{i}", problem="2+3?", prefix_text=f"{tag} p{i} =", num_samples=1, seed=i
    )
    for i in range(k)
  ]


def make_client(server, backend: str, monkeypatch, **kw):
  monkeypatch.setenv("TEST_TEACHER_KEY", KEY)
  cfg = dict(backend=backend, base_url=server.url(PREFIX[backend]), model="m", **FAST)
  cfg.update(api_key_env="TEST_TEACHER_KEY", **kw)
  if backend == "openai_chat":
    cfg["chat_mode"] = "trailing_assistant"
  return tc.TeacherClient.from_config(cfg)


@pytest.mark.parametrize("backend", sorted(PREFIX))
def test_key_echoed_in_error_bodies_never_leaves_the_client(backend, monkeypatch, caplog):
  caplog.set_level(logging.DEBUG)
  teacher = fts.FakeTeacher(api_key=KEY, echo_key=True)
  with fts.ServerThread(teacher) as server, make_client(server, backend, monkeypatch) as client:
    results = client.generate(
      forks("[[fault:500,500,500,500]]") + forks("[[fault:400]]"), timeout=30
    )
    metrics = client.metrics()
  seen = [r for r in teacher.log if r["fault"]]
  assert seen and any(KEY in str(r["headers"]) for r in seen)  # the key did travel, and came back
  errors = [s.error for r in results for s in r]
  assert all(errors) and any("you sent" in e for e in errors)  # the echo reached the client...
  assert any(secrets.REDACTED in e for e in errors)
  assert not any(KEY in e for e in errors)  # ...without the key
  assert KEY not in caplog.text and KEY not in repr(metrics) and KEY not in repr(client)


def test_key_echoed_by_an_auth_failure_is_scrubbed_from_halt_probe_and_logs(monkeypatch, caplog):
  caplog.set_level(logging.DEBUG)
  teacher = fts.FakeTeacher(api_key="a-different-key", echo_key=True)
  with fts.ServerThread(teacher) as server:
    client = make_client(server, "openai_completions", monkeypatch)
    with client:
      with pytest.raises(tc.TeacherError) as probe_error:
        client.probe(timeout=30)
      samples = client.generate(forks("after the halt"), timeout=30)
      halted = client.halted
  assert "HTTP 401" in str(probe_error.value) and "you sent" in str(probe_error.value)
  assert KEY not in str(probe_error.value)
  assert halted and "401" in halted and KEY not in halted
  assert all(KEY not in s.error for r in samples for s in r)
  assert "teacher halted" in caplog.text and KEY not in caplog.text


def test_redacting_filter_scrubs_messages_and_tracebacks(caplog):
  redactor = secrets.Redactor([KEY, f"Bearer {KEY}", "ab"])  # "ab": too short to scrub
  assert (
    redactor.scrub(f"Authorization: Bearer {KEY} ab") == f"Authorization: {secrets.REDACTED} ab"
  )
  log = logging.getLogger("omniopd_jax.teacher.dispatch")
  secrets.install(redactor, ["omniopd_jax.teacher.dispatch"])
  try:
    caplog.set_level(logging.DEBUG)
    try:
      raise ValueError(f"boom {KEY}")
    except ValueError:
      log.exception("failed with %s", KEY)
  finally:
    secrets.uninstall(redactor)
  assert "boom" in caplog.text and "failed with" in caplog.text and KEY not in caplog.text
