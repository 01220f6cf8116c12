"""`python -m omniopd_jax.serve` against the official `openai` SDK (completions and chat) and the
abuse a public endpoint meets: huge prompts, huge n, unknown models, pathological JSON, unknown
routes, clients that hang up. A real subprocess on 127.0.0.1 serving a tiny random Qwen3."""

import concurrent.futures
import json
import threading
import time
import urllib.error
import urllib.request

import conftest
import openai
import pytest
import transformers

from omniopd_jax.data import tasks
from omniopd_jax.teacher import client as tc
from omniopd_jax.teacher import engine
from omniopd_jax.teacher import server as serve

LIMITS = dict(max_n=8, max_rows=16, max_prompt_chars=20000, max_body_mb=4)


@pytest.fixture(scope="module")
def tokenizer():
  return tasks.make_char_tokenizer()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
  path = str(tmp_path_factory.mktemp("qwen3"))
  conftest.save_tiny_char_model(
    transformers.Qwen3Config, path, tokenizer, head_dim=16, max_position_embeddings=256
  )
  handle = serve.start_subprocess(path, served_model_name="tiny", max_tokens_cap=32, **LIMITS)
  yield handle
  assert handle.stop() == 0, handle.log_tail()


@pytest.fixture(scope="module")
def sdk(server):
  return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def http(server, path, data: bytes | None = None, method="POST", timeout=60):
  """(status, headers, parsed JSON body) of one raw request."""
  req = urllib.request.Request(
    server.root + path, data=data, method=method, headers={"Content-Type": "application/json"}
  )
  try:
    with urllib.request.urlopen(req, timeout=timeout) as resp:
      return resp.status, resp.headers, json.loads(resp.read())
  except urllib.error.HTTPError as e:
    return e.code, e.headers, json.loads(e.read())


def rss_mb(pid: int) -> float:
  with open(f"/proc/{pid}/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


# ------------------------------------------------------------------------------ the openai SDK


def test_sdk_completions_n_seed_stop_logprobs(sdk):
  kw = dict(model="tiny", prompt="2 + 3 =", n=3, seed=7, max_tokens=12, stop=["9"], logprobs=2)
  first, again = sdk.completions.create(**kw), sdk.completions.create(**kw)
  assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded
  assert len(first.choices) == 3 and first.model == "tiny"
  for c in first.choices:
    assert "9" not in c.text and c.finish_reason in ("stop", "length")
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) > 0
    assert all(len(top) <= 3 for top in c.logprobs.top_logprobs)  # 2, plus the chosen token
  assert first.usage.prompt_tokens == len("2 + 3 =")  # one token a character


def test_sdk_chat_uses_the_chat_template_with_n_seed_stop_logprobs(sdk, tokenizer):
  messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": "2 + 3?"}]
  kw = dict(model="tiny", messages=messages, n=2, seed=3, max_tokens=10, stop=["7"])
  chat = sdk.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
  assert [c.message.content for c in chat.choices] == [
    c.message.content for c in sdk.chat.completions.create(**kw).choices
  ]
  rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
  assert chat.usage.prompt_tokens == len(ids) and chat.object == "chat.completion"
  # The same draws as a completion of the rendered prompt: chat is the template, nothing else.
  plain = sdk.completions.create(model="tiny", prompt=ids, n=2, seed=3, max_tokens=10, stop=["7"])
  assert [c.message.content for c in chat.choices] == [c.text for c in plain.choices]
  for c in chat.choices:
    assert c.message.role == "assistant" and "7" not in c.message.content
    assert c.logprobs.content and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    assert all(
      t.logprob <= 0 and t.top_logprobs[0].logprob >= t.logprob for t in c.logprobs.content
    )


def test_sdk_chat_continues_an_assistant_prefill(sdk, tokenizer):
  messages = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "It is"}]
  extra = {"continue_final_message": True, "add_generation_prompt": False}
  chat = sdk.chat.completions.create(
    model="tiny", messages=messages, max_tokens=5, seed=1, extra_body=extra
  )
  rendered = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
  assert rendered.endswith("It is")
  assert chat.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_sdk_errors_are_typed(sdk):
  with pytest.raises(openai.NotFoundError, match="does not exist"):
    sdk.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
  with pytest.raises(openai.NotFoundError):
    sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
  with pytest.raises(openai.BadRequestError, match="--max_n"):
    sdk.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": "hi"}], n=9, max_tokens=2
    )
  with pytest.raises(openai.BadRequestError, match="--max_rows"):
    sdk.completions.create(model="tiny", prompt=["a", "b", "c"], n=8, max_tokens=2)


def test_our_openai_chat_teacher_backend_prefills_through_the_chat_route(server):
  cfg = dict(backend="openai_chat", base_url=server.url, model="tiny", max_tokens=6, timeout_s=60.0)
  fork = tc.TeacherRequest(key="c", problem="2 + 3?", prefix_text="It is", num_samples=3, seed=2)
  with tc.TeacherClient.from_config(cfg) as client:
    assert client.probe()["mode"] == "prefill"  # continue_final_message is honoured
    (samples,) = client.generate([fork], timeout=60)
    metrics = client.metrics()
  assert len(samples) == 3 and all(s.ok or s.empty for s in samples)
  assert metrics["teacher/samples_failed"] == 0


# ------------------------------------------------------------------------------- the abuse list


def test_an_over_long_prompt_is_refused_by_length_with_the_loop_free(server):
  before = rss_mb(server.proc.pid)
  body = json.dumps({"model": "tiny", "prompt": "x" * 3_000_000, "max_tokens": 2}).encode()
  health = []

  def poll():
    t0 = time.perf_counter()
    urllib.request.urlopen(server.root + "/health", timeout=10).read()
    health.append(time.perf_counter() - t0)

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    answers = [pool.submit(http, server, "/v1/completions", body) for _ in range(3)]
    for _ in range(5):
      poll()
    status, _, out = answers[0].result()
  took = time.perf_counter() - t0
  assert status == 400 and out["error"]["code"] == "context_length_exceeded"
  assert all(a.result()[0] == 400 for a in answers) and took < 10
  assert max(health) < 2.0  # /health is answered while the big bodies are handled
  assert rss_mb(server.proc.pid) - before < 300  # nothing was tokenised or kept


@pytest.mark.parametrize(
  "body, param",
  [
    ({"prompt": "hi", "n": 9}, "n"),
    ({"prompt": ["a", "b", "c"], "n": 6}, "n"),  # 18 samples > --max_rows 16
    ({"prompt": [list(range(1, 300))], "max_tokens": 2}, "prompt"),  # ids past the context
  ],
)
def test_caps_answer_400(server, body, param):
  status, _, out = http(server, "/v1/completions", json.dumps({"model": "tiny", **body}).encode())
  assert status == 400 and out["error"]["param"] == param, out


def test_unknown_model_is_404_as_from_vllm(server):
  status, _, out = http(server, "/v1/completions", b'{"model": "nope", "prompt": "hi"}')
  assert (
    status == 404
    and out["error"]["code"] == "model_not_found"
    and "nope" in out["error"]["message"]
  )


def test_pathological_json_is_400(server):
  deep = b"[" * 100_000 + b"]" * 100_000
  for data in (deep, b'{"prompt": ' + deep + b"}", b"\xff\xfe{", b"{"):
    status, _, out = http(server, "/v1/completions", data)
    assert status == 400 and "not valid JSON" in out["error"]["message"]


def test_every_error_route_answers_openai_json(server):
  status, _, out = http(server, "/v1/nothing", b"{}")
  assert status == 404 and out["error"]["type"] == "invalid_request_error"
  status, headers, out = http(server, "/v1/completions", method="GET")
  assert status == 405 and "POST" in headers["Allow"] and "error" in out
  status, _, out = http(server, "/v1/completions", b" " * (5 * 2**20))  # > --max_body_mb 4
  assert status == 413 and "error" in out


class _SlowStub:
  """No JAX: an engine whose batches take 0.5 s and that records which jobs it ran."""

  name, max_model_len, vocab_size = "stub", 64, 100

  def __init__(self):
    self.ran = []

  def tokenize(self, text, add_special_tokens=True):
    return tuple(ord(ch) % 100 for ch in text)

  def check(self, job):
    pass

  def run(self, jobs):
    self.ran.extend(job.prompts[0] for job in jobs)
    time.sleep(0.5)
    return [[engine.Choice("x", [1], "length")] * job.params.n for job in jobs]


def test_a_client_that_hangs_up_gets_its_queued_job_dropped():
  stub = _SlowStub()
  srv = serve.ServerThread(stub, max_batch=1)  # one job a batch: the second one queues
  try:
    url = srv.url + "/completions"
    post = lambda prompt, timeout: urllib.request.urlopen(
      urllib.request.Request(url, json.dumps({"prompt": prompt}).encode()), timeout=timeout
    )
    first = threading.Thread(target=lambda: post("a", 10).read())
    first.start()
    time.sleep(0.1)
    with pytest.raises(OSError):  # the client gives up while its job waits behind "a"
      post("b", 0.2).read()
    first.join()
    time.sleep(0.3)
    assert post("c", 10).status == 200
  finally:
    srv.close()
  assert stub.ran == [stub.tokenize("a"), stub.tokenize("c")]  # "b" was never generated
