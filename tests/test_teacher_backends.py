"""Teacher backends: request building, packing, parsing and error classification, unit-level and
over the wire against fake OpenAI / Anthropic / Gemini servers on 127.0.0.1."""

import email.utils
import json
import os
import sys
import time

import numpy as np
import pytest

from omniopd_jax.teacher import backends as tb
from omniopd_jax.teacher import client as tc

sys.path.insert(0, os.path.dirname(__file__))
import fake_teacher_servers as fts  # noqa: E402

FAST = dict(backoff_base_s=0.001, backoff_cap_s=0.01, storm_pause_s=0.01, timeout_s=5.0)


def req(key="k", **kw):
  kw.setdefault("max_tokens", 8)
  kw.setdefault("temperature", 1.0)
  return tb.TeacherRequest(key=key, **kw)


@pytest.fixture
def server():
  with fts.ServerThread(fts.FakeTeacher(api_key="sk-test-123")) as srv:
    yield srv


# ------------------------------------------------------------------------------- request building


def test_completions_packing_covers_every_sample_once():
  b = tb.make_backend("openai_completions", model="m", samples_per_request=3, prompts_per_request=4)
  items = [
    (i, req(f"r{i}", prefix_token_ids=(1, 2, i), num_samples=5, seed=11), range(5))
    for i in range(5)
  ]
  items.append((5, req("text", prefix_text="Once upon", num_samples=2), [0, 1]))
  calls = b.pack(items)
  slots = [s for c in calls for s in c.slots]
  expected = [(i, j) for i in range(5) for j in range(5)] + [(5, 0), (5, 1)]
  assert sorted(slots) == sorted(expected)  # every sample exactly once
  for c in calls:
    p = c.payload
    assert p["max_tokens"] == 8 and p["n"] == c.n <= 3  # max_tokens always set
    prompts = (
      p["prompt"]
      if isinstance(p["prompt"], list) and isinstance(p["prompt"][0], list | str)
      else [p["prompt"]]
    )
    assert len(prompts) * c.n == len(c.slots) and len(prompts) <= 4
    assert len({type(x) for x in prompts}) == 1  # token ids and text never share a call
    assert c.max_tokens_out == 8 * len(c.slots) and c.mode == "raw"
  id_calls = [c for c in calls if c.slots[0][0] < 5]
  seeds = {(c.slots[0][1], c.payload["seed"]) for c in id_calls}
  assert len({s for _, s in seeds}) == len(seeds) > 1  # runs of one prefix never share a seed
  single = b.pack([(0, req(prefix_token_ids=(7, 8)), [0])])[0]
  assert single.payload["prompt"] == [7, 8] and "stop" not in single.payload


def test_completions_parse_maps_flattened_index_and_splits_usage():
  b = tb.make_backend("openai_completions", model="m")
  call = b.pack(
    [
      (0, req("a", prefix_text="A", num_samples=2), [0, 1]),
      (1, req("b", prefix_text="B", num_samples=2), [0, 1]),
    ]
  )[0]
  assert call.payload["prompt"] == ["A", "B"] and call.slots == [(0, 0), (0, 1), (1, 0), (1, 1)]
  body = {
    "choices": [  # shuffled: the index, not the order, says prompt_index * n + sample_index
      {"index": 3, "text": " b1", "finish_reason": "length", "token_ids": [5, 6]},
      {"index": 0, "text": " a0", "finish_reason": "stop", "token_ids": [1]},
      {"index": 2, "text": "", "finish_reason": "stop", "token_ids": []},
    ],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
  }
  s = b.parse(call, body)
  assert [x.text for x in s] == [" a0", None, None, " b1"]
  assert s[1].error.endswith(tb.MISSING) and "empty" in s[2].error  # never silently ""
  null = b.parse(call, {"choices": [{"index": 0, "text": None}], "usage": {}})[0]
  assert null.error.endswith(tb.MISSING)  # the client asks again for these
  assert s[3].token_ids == (5, 6) and s[0].finish_reason == "stop"
  assert sum(x.tokens_in for x in s) == 7 and sum(x.tokens_out for x in s) == 3
  with pytest.raises(tb.MalformedResponse):
    b.parse(call, {"usage": {}})


def test_chat_modes_build_and_clean():
  b = tb.make_backend("openai_chat", model="m")
  r = req(
    problem="What is 2+2?",
    prefix_text="We add: 2+2 =",
    num_samples=3,
    system="Be brief.",
    stop=("</s>",),
  )
  p = b.pack([(0, r, range(3))])[0].payload
  assert p["continue_final_message"] is True and p["add_generation_prompt"] is False
  assert [m["role"] for m in p["messages"]] == ["system", "user", "assistant"] and p["n"] == 3
  assert p["messages"][-1]["content"] == "We add: 2+2 =" and p["stop"] == ["</s>"]
  b.set_chat_mode("trailing_assistant")
  p = b.pack([(0, r, range(3))])[0].payload
  assert (
    "continue_final_message" not in p
    and p["messages"][-1]["role"] == "assistant"
    and b.mode == "prefill"
  )
  b.set_chat_mode("instructed")
  call = b.pack([(0, r, range(1))])[0]
  assert (
    b.approximate and call.mode == "instructed" and call.payload["messages"][-1]["role"] == "user"
  )
  assert "We add: 2+2 =" in call.payload["messages"][-1]["content"]
  body = {"choices": [{"index": 0, "message": {"content": "Continuing: We add: 2+2 = 4, done."}}]}
  assert b.parse(call, body)[0].text == " 4, done."
  assert tb.clean_instructed("```\n 4.\n```", "x") == " 4."
  assert tb.clean_instructed("so 4", "2+2 =") == "so 4"  # short overlaps are kept
  with pytest.raises(ValueError, match="chat_mode"):
    b.set_chat_mode("guess")


def test_anthropic_prefill_whitespace_one_request_per_sample():
  b = tb.make_backend("anthropic", model="claude-haiku-4-5", api_key="sk-x")
  r = req(
    problem="Add 2 and 3.", prefix_text="The sum is\n", num_samples=3, system="S", temperature=0.7
  )
  calls = b.pack([(0, r, range(3))])
  assert len(calls) == 3 and all(c.n == 1 for c in calls)  # no `n`: one request per sample
  p = calls[0].payload
  assert p["messages"][-1] == {
    "role": "assistant",
    "content": "The sum is",
  }  # no trailing whitespace
  assert (
    p["temperature"] == 0.7 and "top_p" not in p and p["max_tokens"] == 8 and p["system"] == "S"
  )
  assert calls[0].est_tokens_in > 0 and "seed" not in p
  body = {"content": [{"type": "text", "text": "\n5."}, {"type": "text", "text": " Done"}], "stop_reason": "max_tokens",
          "usage": {"input_tokens": 10, "cache_read_input_tokens": 2, "output_tokens": 4}}  # fmt: skip
  s = b.parse(calls[0], body)[0]
  assert s.text == "5. Done" and "The sum is\n" + s.text == "The sum is\n5. Done"
  assert (s.tokens_in, s.tokens_out) == (12, 4)
  glued = b.parse(calls[0], {**body, "content": [{"type": "text", "text": "5"}]})[0]
  assert glued.text == "5"  # the teacher did not repeat the newline: nothing to drop
  refusal = b.parse(calls[0], {**body, "stop_reason": "refusal"})[0]
  assert not refusal.ok and "refus" in refusal.error and refusal.tokens_out == 4
  empty = b.pack([(0, req(problem="q", prefix_text="  "), [0])])[0].payload
  assert [m["role"] for m in empty["messages"]] == ["user"]  # an all-space prefill is omitted
  assert b.auth_headers()["x-api-key"] == "sk-x" and "sk-x" not in repr(b)


def test_gemini_candidates_thinking_and_parse():
  b = tb.make_backend("gemini", model="gemini-2.5-flash")
  r = req(problem="Add.", prefix_text="2 + 3 =", num_samples=10, seed=5, stop=tuple("abcdefg"))
  calls = b.pack([(0, r, range(10))])
  assert [c.n for c in calls] == [8, 2]  # candidateCount <= 8
  g = [c.payload["generationConfig"] for c in calls]
  assert g[0]["candidateCount"] == 8 and g[0]["thinkingConfig"] == {"thinkingBudget": 0}
  assert g[0]["seed"] != g[1]["seed"] and len(g[0]["stopSequences"]) == 5
  assert calls[0].payload["contents"][-1] == {"role": "model", "parts": [{"text": "2 + 3 ="}]}
  assert calls[0].path == "/models/gemini-2.5-flash:generateContent"
  call = calls[1]
  body = {"candidates": [{"index": 1, "content": {"parts": [{"text": "think", "thought": True}, {"text": " 5"}]},
                          "finishReason": "STOP"}, {"index": 0, "finishReason": "SAFETY"}],
          "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 3, "thoughtsTokenCount": 4}}  # fmt: skip
  s = b.parse(call, body)
  assert not s[0].ok and "SAFETY" in s[0].error and s[1].text == " 5"
  assert (
    sum(x.tokens_out for x in s) == 7 and sum(x.tokens_in for x in s) == 9
  )  # thoughts are output
  blocked = b.parse(call, {"promptFeedback": {"blockReason": "SAFETY"}})
  assert all("blocked" in x.error for x in blocked)
  with pytest.raises(tb.MalformedResponse):
    b.parse(call, {"usageMetadata": {}})


def test_validate_rejects_unusable_requests():
  chat = tb.make_backend("anthropic", model="claude-haiku-4-5")
  with pytest.raises(ValueError, match="problem"):
    chat.validate(req(prefix_text="x"))
  with pytest.raises(ValueError, match="temperature"):
    chat.validate(req(problem="q", prefix_text="x", temperature=1.5))
  with pytest.raises(ValueError, match="prefix"):
    tb.make_backend("openai_completions", model="m").validate(req())
  with pytest.raises(ValueError, match="unknown teacher backend"):
    tb.make_backend("local_typo", model="m")
  with pytest.raises(ValueError, match="model"):
    tb.make_backend("gemini", model="")


# --------------------------------------------------------------------------- error classification


@pytest.mark.parametrize(
  "status,headers,body,kind,extra",
  [
    (200, {}, b'{"choices": [', "retry", "malformed"),
    (200, {}, b'{"error": {"message": "upstream failed"}}', "retry", "error body"),
    (200, {}, b'{"object": "error", "message": "boom"}', "retry", "boom"),
    (408, {}, b"", "retry", ""),
    (409, {}, b"", "retry", ""),
    (429, {"Retry-After": "3"}, b'{"error": {"message": "slow down"}}', "retry", "slow down"),
    (500, {}, b"<html>oops</html>", "retry", "oops"),
    (503, {}, b"", "retry", ""),
    (
      529,
      {},
      b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
      "retry",
      "Overloaded",
    ),
    (400, {}, b'{"error": {"message": "prompt is too long"}}', "fatal", "too long"),
    (413, {}, b"", "fatal", ""),
    (401, {}, b'{"error": {"message": "invalid x-api-key"}}', "halt", "api_key_env"),
    (403, {}, b"", "halt", "not authorised"),
    (404, {}, b'{"error": {"message": "model not found"}}', "halt", "retired"),
    (402, {}, b'{"error": {"message": "Insufficient credits"}}', "halt", "spend"),
    (
      429,
      {},
      b'{"error": {"message": "limit", "details": {"error_code": "enforced_spend_limit_reached"}}}',
      "halt",
      "spend",
    ),
    (
      429,
      {},
      b'{"error": {"code": "insufficient_quota", "message": "You exceeded your quota"}}',
      "halt",
      "spend",
    ),
    (
      400,
      {},
      b'{"error": {"message": "This model does not support assistant message prefill."}}',
      "halt",
      "prefill",
    ),
    (
      400,
      {},
      b'{"error": {"message": "Requests ending with a model turn are not supported."}}',
      "halt",
      "prefill",
    ),
    (
      400,
      {},
      b'{"error": {"message": "Multiple candidates is not enabled for this model"}}',
      "halt",
      "samples",
    ),
    (
      400,
      {},
      b'{"error": {"message": "temperature is not supported; remove it"}}',
      "halt",
      "temperature",
    ),
  ],
)
def test_classify(status, headers, body, kind, extra):
  v = tb.make_backend("openai_chat", model="m").classify(status, headers, body)
  assert v.kind == kind, v
  assert extra in v.reason or extra == v.capability, v.reason
  assert v.rate_limited == (status in (429, 529) and kind == "retry")


def test_retry_after_sources():
  assert tb.retry_after_seconds({"retry-after-ms": "250"}) == 0.25
  assert tb.retry_after_seconds({"Retry-After": "7"}) == 7.0
  date = email.utils.formatdate(time.time() + 30, usegmt=True)
  assert 25 < tb.retry_after_seconds({"Retry-After": date}) <= 31
  gemini = {
    "error": {
      "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "13s"}]
    }
  }
  assert tb.retry_after_seconds({}, gemini) == 13.0
  reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 20))
  h = {"anthropic-ratelimit-tokens-remaining": "0", "anthropic-ratelimit-tokens-reset": reset}
  assert 15 < tb.retry_after_seconds(h) <= 21
  assert tb.retry_after_seconds({"anthropic-ratelimit-tokens-remaining": "5"}) is None
  assert tb.retry_after_seconds({"Retry-After": "soon"}) is None
  a = tb.make_backend("anthropic", model="claude-haiku-4-5")
  assert a.classify(200, {}, b'{"type": "error", "error": {"message": "x"}}').kind == "retry"


def test_split_evenly_is_exact():
  for total in range(0, 23):
    for parts in range(1, 7):
      shares = tb.split_evenly(total, parts)
      assert sum(shares) == total and max(shares) - min(shares) <= 1


# ------------------------------------------------------------------------------ over the wire


def _client(server, backend, model, prefix="/v1", **kw):
  os.environ["FAKE_TEACHER_KEY"] = "sk-test-123"
  cfg = dict(
    backend=backend,
    base_url=server.url(prefix),
    model=model,
    api_key_env="FAKE_TEACHER_KEY",
    **FAST,
  )
  return tc.TeacherClient.from_config({**cfg, **kw})


@pytest.mark.parametrize(
  "backend,model,prefix,auth_header",
  [
    ("openai_completions", "m", "/v1", "Authorization"),
    ("openai_chat", "m", "/v1", "Authorization"),
    ("anthropic", "claude-haiku-4-5", "/v1", "x-api-key"),
    ("gemini", "gemini-2.5-flash", "/v1beta", "x-goog-api-key"),
  ],
)
def test_wire_format_round_trip(server, backend, model, prefix, auth_header):
  with _client(server, backend, model, prefix) as client:
    info = client.probe()
    assert (
      info["mode"] == ("raw" if backend == "openai_completions" else "prefill") and info["text"]
    )
    reqs = [
      req(f"q{i}", problem=f"Problem {i}?", prefix_text=f"Step {i}: x =", num_samples=3, seed=i)
      for i in range(4)
    ]
    results = client.generate(reqs, timeout=30)
    m = client.metrics()
  for i, samples in enumerate(results):
    assert len(samples) == 3 and all(s.ok and s.mode == info["mode"] for s in samples)
    assert all(
      f"[{f'{i}: x ='[-6:]}]" in s.text for s in samples
    )  # each fork got its own prefix back
  assert m["teacher/tokens_in"] == server.teacher.billed["tokens_in"] > 0
  assert m["teacher/tokens_out"] == server.teacher.billed["tokens_out"] > 0
  assert m["teacher/samples_ok"] == 12 and m["teacher/samples_failed"] == 0
  entry = server.teacher.log[-1]
  assert "sk-test-123" in entry["headers"][auth_header]
  assert "sk-test-123" not in repr(client) and "sk-test-123" not in entry["path"]
  body = json.loads(entry["body"])
  if backend == "anthropic":
    assert entry["headers"]["anthropic-version"] == "2023-06-01"
  if backend == "gemini":
    assert body["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}


def test_token_ids_in_and_out(server):
  ids = np.array([3, 1, 4, 1, 5], np.int32)  # numpy ids from the sampler are accepted
  with _client(server, "openai_completions", "m", extra_body={"return_token_ids": True}) as client:
    (samples,) = client.generate(
      [req(prefix_token_ids=ids, num_samples=2, max_tokens=4, stop=["\n\n"])]
    )
  assert [s.token_ids for s in samples] == [(0, 1, 2, 3)] * 2
  assert all("after[5]" in s.text for s in samples)
  body = json.loads(server.teacher.log[-1]["body"])
  assert body["prompt"] == [3, 1, 4, 1, 5] and body["stop"] == ["\n\n"]


def test_probe_detects_refusals(server):
  with pytest.raises(tc.TeacherCapabilityError, match="prefill"):
    with _client(server, "anthropic", "claude-sonnet-4-6") as client:
      client.probe()
  with pytest.raises(tc.TeacherCapabilityError, match="refuses `temperature`"):
    with _client(server, "anthropic", "claude-haiku-5-5") as client:
      client.probe()
  with pytest.raises(tc.TeacherCapabilityError, match="prefill"):
    with _client(server, "gemini", "gemini-3.6-flash", "/v1beta") as client:
      client.probe()
  with _client(server, "gemini", "gemini-3.5-flash", "/v1beta") as client:
    assert client.probe()["samples_per_request"] == 1  # refused candidateCount > 1: lowered
    (samples,) = client.generate([req(problem="p", prefix_text="x", num_samples=3)])
    assert all(s.ok for s in samples) and client.halted is None
  with pytest.raises(tc.TeacherCapabilityError, match="allow_approximate"):
    with _client(server, "openai_chat", "gpt-4o") as client:
      client.probe()
  with _client(server, "openai_chat", "gpt-4o", allow_approximate=True) as client:
    info = client.probe()
    assert info["mode"] == "instructed" and info["approximate"]
    (samples,) = client.generate([req(problem="p", prefix_text="The answer is", num_samples=2)])
    assert all(
      s.ok and s.mode == "instructed" and not s.text.startswith("Continuing") for s in samples
    )
    assert client.metrics()["teacher/approximate"] == 1.0
  with pytest.raises(tc.TeacherCapabilityError, match="allow_approximate"):
    _client(
      server, "openai_chat", "m", chat_mode="instructed"
    )  # configured approximate: refused up front
