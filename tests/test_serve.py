"""`python -m omniopd_jax.serve` as a real subprocess on 127.0.0.1 (a tiny random Qwen3 with a
character tokenizer): OpenAI wire format, prompts of every kind, n, seeds under batching, stop
strings, log-probs and echo against a transformers teacher-forced pass, 400s, and TeacherClient."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import conftest
import numpy as np
import pytest
import torch
import transformers

from omniopd_jax.data import tasks
from omniopd_jax.teacher import client as tc
from omniopd_jax.teacher import local as teacher_local
from omniopd_jax.teacher import server as serve

MAX_LEN = 128  # max_position_embeddings
CAP = 64  # --max_tokens_cap


@pytest.fixture(scope="module")
def tokenizer():
  return tasks.make_char_tokenizer()


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, tokenizer):
  """(model dir, torch model): a random Qwen3 saved by transformers with the char tokenizer."""
  path = str(tmp_path_factory.mktemp("qwen3"))
  model = conftest.save_tiny_char_model(
    transformers.Qwen3Config, path, tokenizer, head_dim=16, max_position_embeddings=MAX_LEN
  )
  return path, model


@pytest.fixture(scope="module")
def server(hf_model):
  handle = serve.start_subprocess(hf_model[0], max_tokens_cap=CAP, served_model_name="tiny")
  yield handle
  assert handle.stop() == 0, handle.log_tail()  # SIGTERM shuts it down cleanly
  assert not _reachable(handle.root + "/health")


def _reachable(url):
  try:
    urllib.request.urlopen(url, timeout=2)
    return True
  except OSError:
    return False


def post(server, body, raw=None):
  """(status, JSON body) of POST /v1/completions."""
  data = raw if raw is not None else json.dumps(body).encode()
  req = urllib.request.Request(
    server.url + "/completions", data=data, headers={"Content-Type": "application/json"}
  )
  try:
    with urllib.request.urlopen(req, timeout=120) as resp:
      return resp.status, json.loads(resp.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def complete(server, **body):
  status, out = post(server, body)
  assert status == 200, out
  return out


BASE = dict(prompt=["ab", "hello"], n=2, max_tokens=8, seed=1, return_token_ids=True)


def texts(out):
  return [c["text"] for c in out["choices"]]


def test_health_and_models(server):
  with urllib.request.urlopen(server.root + "/health", timeout=5) as resp:
    assert resp.status == 200
  with urllib.request.urlopen(server.url + "/models", timeout=5) as resp:
    models = json.loads(resp.read())
  assert models["object"] == "list"
  assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == MAX_LEN
  assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")


def test_wire_format_indices_and_usage(server, tokenizer):
  out = complete(server, **BASE)
  assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
  assert out["model"] == "tiny" and isinstance(out["created"], int)
  choices = out["choices"]
  assert [c["index"] for c in choices] == [0, 1, 2, 3]  # prompt index * n + sample index
  prompt_ids = [tokenizer("ab")["input_ids"], tokenizer("hello")["input_ids"]]
  for c in choices:
    assert set(c) == {
      "index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids", "prompt_token_ids"
    }  # fmt: skip
    assert c["prompt_token_ids"] == prompt_ids[c["index"] // 2]
    ids = c["token_ids"]
    assert 1 <= len(ids) <= 8 and c["logprobs"] is None
    assert c["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    # EOS ends a choice early with "stop"; otherwise it runs to max_tokens: "length".
    assert c["finish_reason"] == ("stop" if ids[-1] == 2 else "length")
    assert c["finish_reason"] == "stop" or len(ids) == 8
  assert out["usage"] == {
    "prompt_tokens": 2 + 5,  # each prompt once, not n times
    "completion_tokens": sum(len(c["token_ids"]) for c in choices),
    "total_tokens": 7 + sum(len(c["token_ids"]) for c in choices),
  }
  assert len(set(texts(out)[:2])) == 2  # the n samples of one prompt are independent
  # Without return_token_ids the choices carry what vLLM sends by default.
  plain = complete(server, **{**BASE, "return_token_ids": False})
  assert "token_ids" not in plain["choices"][0] and texts(plain) == texts(out)


def test_token_id_prompts_equal_text_prompts(server, tokenizer):
  by_text = complete(server, **BASE)
  ids = [tokenizer("ab")["input_ids"], tokenizer("hello")["input_ids"]]
  by_ids = complete(server, **{**BASE, "prompt": ids})
  assert texts(by_ids) == texts(by_text)
  single = complete(server, **{**BASE, "prompt": ids[0]})  # one prompt as a flat id list
  single_text = complete(server, **{**BASE, "prompt": "ab"})
  assert len(single["choices"]) == 2 and texts(single) == texts(single_text)


def test_seed_determinism_under_concurrent_batching(server):
  alone = texts(complete(server, **BASE))
  assert texts(complete(server, **BASE)) == alone  # same request twice
  others = [
    dict(BASE, seed=2),
    dict(BASE, prompt="xyz"),
    dict(BASE, seed=None, prompt="q"),  # unseeded: these may merge into one sampler call
    dict(BASE, seed=None, prompt="ab"),
  ]
  bodies = [BASE, *others, BASE]
  with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
    outs = list(pool.map(lambda b: complete(server, **b), bodies))
  assert texts(outs[0]) == alone and texts(outs[-1]) == alone
  assert texts(outs[1]) != alone  # another seed, other samples
  for body, out in zip(bodies, outs):
    prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
    assert len(out["choices"]) == 2 * len(prompts)
    assert [c["prompt_token_ids"] for c in out["choices"][::2]] == [
      [int(t) for t in tasks.make_char_tokenizer()(p)["input_ids"]] for p in prompts
    ]  # each request got its own rows back


def test_stop_strings(server, tokenizer):
  # A sample that ran to max_tokens, and a stop string from its middle.
  for seed in range(10):
    body = dict(BASE, prompt="ab", seed=seed)
    full = complete(server, **body)["choices"][0]
    if full["finish_reason"] == "length" and len(full["text"]) >= 6:
      break
  stop = full["text"][3:5]
  cut = full["text"].find(stop)
  out = complete(server, **body, stop=[stop, "not-in-text"])["choices"][0]
  assert out["text"] == full["text"][:cut]
  assert out["finish_reason"] == "stop" and out["stop_reason"] == stop
  # Generation ends with the token that completed the stop string.
  n_tokens = next(
    t
    for t in range(1, 9)
    if stop in tokenizer.decode(full["token_ids"][:t], skip_special_tokens=True)
  )
  assert out["token_ids"] == full["token_ids"][:n_tokens]
  kept = complete(server, **body, stop=stop, include_stop_str_in_output=True)["choices"][0]
  assert kept["text"] == full["text"][: cut + len(stop)]


def _reference_logprobs(torch_model, ids):
  """log p(ids[j] | ids[:j]) for j >= 1 and the full log-softmax rows, by transformers."""
  with torch.no_grad():
    logits = torch_model(torch.tensor([ids])).logits[0].double()
  logp = torch.log_softmax(logits, dim=-1).numpy()  # [T, V]
  return logp[np.arange(len(ids) - 1), ids[1:]], logp[:-1]


def _check_logprobs(obj, ids, torch_model, tokenizer, top, first_null):
  picked, rows = _reference_logprobs(torch_model, ids)
  lp = obj["token_logprobs"]
  if first_null:
    assert lp[0] is None and obj["top_logprobs"][0] is None
    lp, tops = lp[1:], obj["top_logprobs"][1:]
  else:
    picked, rows, tops = picked[-len(lp) :], rows[-len(lp) :], obj["top_logprobs"]
  np.testing.assert_allclose(lp, picked, atol=1e-4)
  for entry, row in zip(tops, rows):
    best = np.argsort(-row)[:top]
    for t in best:
      assert entry[tokenizer.decode([int(t)])] == pytest.approx(row[t], abs=1e-4)
    assert top <= len(entry) <= top + 1  # the sampled token is listed even outside the top


def test_logprobs_and_echo_match_teacher_forcing(server, hf_model, tokenizer):
  torch_model = hf_model[1]
  plain = complete(server, **BASE)
  out = complete(server, **BASE, logprobs=3, echo=True)
  for c, p in zip(out["choices"], plain["choices"]):
    prompt = "ab" if c["index"] < 2 else "hello"
    assert c["text"] == prompt + p["text"] and c["token_ids"] == p["token_ids"]
    ids = c["prompt_token_ids"] + c["token_ids"]
    obj = c["logprobs"]
    assert obj["tokens"] == [tokenizer.decode([t]) for t in ids]
    _check_logprobs(obj, ids, torch_model, tokenizer, top=3, first_null=True)
    offsets = obj["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for tok, off in zip(obj["tokens"], offsets):
      if len(tok) == 1:  # a plain character (specials like <eos> add no text)
        assert c["text"][off] == tok
  # Completion log-probs only (no echo): one entry per generated token.
  only = complete(server, **BASE, logprobs=0)["choices"][3]
  assert len(only["logprobs"]["tokens"]) == len(only["token_ids"])
  ids = only["prompt_token_ids"] + only["token_ids"]
  _check_logprobs(only["logprobs"], ids, torch_model, tokenizer, top=0, first_null=False)


def test_echo_prompt_logprobs_with_zero_max_tokens(server, hf_model, tokenizer):
  """White-box OPD's use: the teacher's log-probs of given tokens, nothing generated."""
  prompts = ["ab", "hello", "abc", "x+y"]
  out = complete(server, prompt=prompts, max_tokens=0, echo=True, logprobs=1)
  assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == 2 + 5 + 3 + 3
  for c, prompt in zip(out["choices"], prompts):
    ids = tokenizer(prompt)["input_ids"]
    assert c["text"] == prompt and c["finish_reason"] == "length"
    assert len(c["logprobs"]["token_logprobs"]) == len(ids)
    _check_logprobs(c["logprobs"], ids, hf_model[1], tokenizer, top=1, first_null=True)


BAD = [
  (b"{not json", None, None),
  ({"max_tokens": 4}, "prompt", None),
  ({"prompt": []}, "prompt", None),
  ({"prompt": [1, "a"]}, "prompt", None),
  ({"prompt": [[1, 2], []]}, "prompt", None),
  ({"prompt": [5, 100]}, "prompt", None),  # id outside the vocabulary
  ({"prompt": "ab", "n": 0}, "n", None),
  ({"prompt": "ab", "n": True}, "n", None),
  ({"prompt": "ab", "max_tokens": -1}, "max_tokens", None),
  ({"prompt": "ab", "max_tokens": 0}, "max_tokens", None),  # 0 needs echo
  ({"prompt": "ab", "max_tokens": CAP + 1}, "max_tokens", None),
  ({"prompt": "a" * 100, "max_tokens": 40}, "prompt", "context_length_exceeded"),
  ({"prompt": "ab", "temperature": -0.5}, "temperature", None),
  ({"prompt": "ab", "top_p": 0}, "top_p", None),
  ({"prompt": "ab", "logprobs": 21}, "logprobs", None),
  ({"prompt": "ab", "stop": ["x", ""]}, "stop", None),
  ({"prompt": "ab", "seed": "7"}, "seed", None),
  ({"prompt": "ab", "stream": True}, "stream", None),
  ([1, 2], None, None),
]


@pytest.mark.parametrize("body,param,code", BAD)
def test_bad_requests_get_openai_style_400(server, body, param, code):
  status, out = post(server, None, raw=body) if isinstance(body, bytes) else post(server, body)
  assert status == 400
  assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}
  err = out["error"]
  assert err["type"] == "invalid_request_error" and err["message"]
  assert err["param"] == param and err["code"] == code


def test_event_loop_answers_while_compiling_and_sampling(server):
  """A request with a new shape compiles and samples on the worker thread; /health still answers."""
  result = {}
  worker = threading.Thread(
    # The shape of TeacherClient.probe's request (40 prompt tokens, n=2): compiled once here.
    target=lambda: result.update(out=complete(server, prompt="ab" * 20, n=2, max_tokens=8, seed=0))
  )
  worker.start()
  latencies = []
  while worker.is_alive():
    t0 = time.monotonic()
    with urllib.request.urlopen(server.root + "/health", timeout=10):
      latencies.append(time.monotonic() - t0)
    time.sleep(0.05)
  worker.join()
  assert len(result["out"]["choices"]) == 2
  assert len(latencies) >= 3 and max(latencies) < 1.0, latencies


def test_teacher_client_end_to_end(server, tokenizer):
  cfg = dict(
    backend="openai_completions",
    base_url=server.url,
    model="tiny",  # the served name (others get a 404, as from vLLM)
    max_tokens=8,
    timeout_s=60.0,
  )
  reqs = [
    tc.TeacherRequest(key="text", prefix_text="2 + 3 =", num_samples=2, seed=5),
    tc.TeacherRequest(
      key="ids", prefix_token_ids=tuple(tokenizer("2 + 3 =")["input_ids"]), num_samples=2, seed=5
    ),
    tc.TeacherRequest(key="stop", prefix_text="ab", num_samples=2, seed=1, stop=("a", "b", "c")),
  ]
  with tc.TeacherClient.from_config(cfg) as client:
    assert client.probe()["mode"] == "raw"
    first = client.generate(reqs, timeout=120)
    again = client.generate(reqs, timeout=120)
    metrics = client.metrics()
  for samples in first[:2]:
    assert len(samples) == 2 and all(s.ok and s.mode == "raw" and s.text for s in samples)
    assert all(s.finish_reason in ("length", "stop") and 1 <= s.tokens_out <= 8 for s in samples)
  # A text prompt and its token ids are the same prompt: same seed, same samples.
  assert [s.text for s in first[0]] == [s.text for s in first[1]]
  assert len(first[2]) == 2 and all(s.ok or "empty" in s.error for s in first[2])
  assert all(not set(s.text) & set("abc") for s in first[2] if s.ok)
  assert [[s.text for s in r] for r in again] == [[s.text for s in r] for r in first]
  assert metrics["teacher/retries"] == 0


class _StubTeacher:
  """No JAX: records how the batcher groups concurrent jobs."""

  name, max_model_len, vocab_size = "stub", 64, 100

  def __init__(self):
    self.batches = []

  def tokenize(self, text, add_special_tokens=True):
    return tuple(ord(ch) % 100 for ch in text)

  def check(self, job):
    teacher_local.LocalTeacher.check(self, job)

  def run(self, jobs):
    self.batches.append(len(jobs))
    time.sleep(0.2)  # later arrivals queue up behind this batch
    p = jobs[0].params
    return [
      [
        teacher_local.Choice(f"job{j.prompts[0]}", [1], "length")
        for _ in range(len(j.prompts) * p.n)
      ]
      for j in jobs
    ]


def test_batcher_groups_concurrent_requests():
  stub = _StubTeacher()
  srv = serve.ServerThread(stub, max_batch=64)
  try:
    bodies = [dict(prompt=f"p{i}", max_tokens=2) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
      outs = list(pool.map(lambda b: complete(srv, **b), bodies))
  finally:
    srv.close()
  for i, out in enumerate(outs):  # every request got its own answer back
    assert out["choices"][0]["text"] == f"job{stub.tokenize(f'p{i}')}"
  assert sum(stub.batches) == 12 and len(stub.batches) < 12 and max(stub.batches) > 1


def test_server_dies_with_its_parent_on_ctrl_c(hf_model):
  """Ctrl-C in the process that started the server stops it (atexit, process group)."""
  script = (
    # A parent whose own parent ignores SIGINT (a test runner's worker) inherits that: restore
    # Python's default Ctrl-C handling first, as an interactive shell would give it.
    "import signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from omniopd_jax import serve; "
    "h = serve.start_subprocess(sys.argv[1]); print(h.root, h.proc.pid, flush=True); time.sleep(120)"
  )
  parent = subprocess.Popen(
    [sys.executable, "-c", script, hf_model[0]], stdout=subprocess.PIPE, text=True
  )
  try:
    root, pid = parent.stdout.readline().split()
    assert _reachable(root + "/health")
    parent.send_signal(signal.SIGINT)
    parent.wait(60)
    with pytest.raises(ProcessLookupError):  # reaped by the parent's stop()
      os.kill(int(pid), 0)
    assert not _reachable(root + "/health")
  finally:
    parent.kill()


def test_start_subprocess_reports_a_failed_start(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    serve.start_subprocess(str(tmp_path / "missing"))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(RuntimeError, match="exited with code 1(.|\n)*model_type"):
    serve.start_subprocess(str(tmp_path), timeout_s=120)
