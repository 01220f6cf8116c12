"""The in-process teacher on a tiny random Llama (transformers-built, char tokenizer): Samples and
failures, seeded determinism whatever the batch, call grouping, teacher-forced log-probs against
transformers, and the `local` backend through TeacherClient."""

import json
import os

import conftest
import numpy as np
import pytest
import torch
import transformers

from omniopd_jax.data import tasks
from omniopd_jax.rollout import sampler
from omniopd_jax.teacher import client as tc
from omniopd_jax.teacher import engine
from omniopd_jax.teacher import local as teacher_local

SP = teacher_local.SamplingParams


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  """(model dir, torch model, tokenizer): a random Llama whose generation_config adds EOS id 5."""
  tokenizer = tasks.make_char_tokenizer()
  path = str(tmp_path_factory.mktemp("llama"))
  model = conftest.save_tiny_char_model(
    transformers.LlamaConfig, path, tokenizer, seed=1, max_position_embeddings=64
  )
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [2, 5]}, f)
  return path, model, tokenizer


@pytest.fixture(scope="module")
def teacher(hf_model):
  return teacher_local.LocalTeacher.from_pretrained(hf_model[0], max_batch=8)


def test_loads_name_limits_and_eos(teacher):
  assert teacher.name.startswith("llama") and teacher.max_model_len == 64
  assert teacher.eos_ids == (2, 5)  # tokenizer/config EOS plus generation_config's


def test_generate_returns_samples_and_failures(teacher, hf_model):
  tokenizer = hf_model[2]
  ids = tuple(tokenizer("ab")["input_ids"])
  reqs = [
    tc.TeacherRequest(key="text", prefix_text="ab", num_samples=2, seed=3),
    tc.TeacherRequest(key="ids", prefix_token_ids=ids, num_samples=2, seed=3),
    tc.TeacherRequest(key="long", prefix_text="a" * 60, num_samples=2, seed=3),
    tc.TeacherRequest(key="none", num_samples=1),
  ]
  out = teacher.generate(reqs, max_tokens=8)
  assert [len(s) for s in out] == [2, 2, 2, 1]
  for s in out[0]:
    assert s.ok and s.text and s.mode == "raw" and not s.from_cache
    assert s.text == tokenizer.decode(list(s.token_ids), skip_special_tokens=True)
    assert s.tokens_out == len(s.token_ids) <= 8
    assert s.finish_reason == ("stop" if s.token_ids[-1] in (2, 5) else "length")
  assert sum(s.tokens_in for s in out[0]) == len(ids)  # the prompt once, split over samples
  assert out[0][0].text != out[0][1].text
  assert [s.text for s in out[1]] == [s.text for s in out[0]]  # ids and text: one prompt
  assert all(not s.ok and "maximum context length is 64" in s.error for s in out[2])
  assert "neither prefix_token_ids nor prefix_text" in out[3][0].error
  again = teacher.generate(reqs[:1], max_tokens=8)
  assert [s.text for s in again[0]] == [s.text for s in out[0]]


def _texts(choices):
  return [c.text for c in choices]


def test_jobs_share_calls_and_seeded_jobs_ignore_batch_mates(teacher, monkeypatch):
  calls = []
  generate = sampler.generate
  monkeypatch.setattr(
    sampler, "generate", lambda model, prompts, **kw: calls.append(len(prompts)) or generate(
      model, prompts, **kw
    )
  )  # fmt: skip
  params = SP(max_tokens=8, n=2, seed=7)
  a = teacher_local.Job(((1, 14), (1, 15, 16)), params)
  b = teacher_local.Job(((1, 14),), SP(max_tokens=8, n=2, seed=8))
  u1 = teacher_local.Job(((1, 20),), SP(max_tokens=8, n=2))
  u2 = teacher_local.Job(((1, 21),), SP(max_tokens=8, n=2))
  alone = teacher.run([a])
  assert calls == [2]
  calls.clear()
  mixed = teacher.run([u1, b, a, u2])
  assert calls == [4, 1]  # calls of max_batch // n = 4 prompts; each job draws from its own seed
  assert _texts(mixed[2]) == _texts(alone[0])
  assert _texts(mixed[1])[:2] != _texts(alone[0])[:2]  # another seed: other samples
  assert all(len(r) == 2 for r in (mixed[0], mixed[1], mixed[3]))
  # Past max_batch rows a job spans several calls, each with its own derived seed, so equal
  # prompts in different calls still get independent samples.
  calls.clear()
  monkeypatch.setattr(teacher, "max_batch", 2)
  split = teacher.run([teacher_local.Job(((1, 14), (1, 14)), params)])[0]
  assert calls == [1, 1]
  assert _texts(split[:2]) != _texts(split[2:])
  assert engine.chunk_seed(7, 0) != engine.chunk_seed(7, 1)
  assert engine.chunk_seed(7, 1) == engine.chunk_seed(7, 1)


def test_score_matches_transformers(teacher, hf_model):
  torch_model = hf_model[1]
  seqs = [[1, 14, 15, 30, 2, 41, 9], [1, 60, 61]]
  for seq, (lp, top_ids, top_lp) in zip(seqs, teacher.score(seqs)):
    with torch.no_grad():
      logits = torch_model(torch.tensor([seq])).logits[0, :-1].double()
    ref = torch.log_softmax(logits, dim=-1).numpy()  # [T-1, V]
    np.testing.assert_allclose(lp, ref[np.arange(len(seq) - 1), seq[1:]], atol=1e-4)
    assert top_ids.shape == (len(seq) - 1, teacher_local.MAX_LOGPROBS)
    np.testing.assert_allclose(top_lp, np.take_along_axis(ref, top_ids, axis=1), atol=1e-4)
    np.testing.assert_allclose(top_lp, -np.sort(-ref, axis=1)[:, :20], atol=1e-4)


def test_stop_cut_and_echo(teacher):
  full = teacher.run([teacher_local.Job(((1, 14),), SP(max_tokens=8, n=2, seed=3))])[0]
  text = next(c.text for c in full if len(c.text) >= 4)
  stop = text[2:4]
  job = teacher_local.Job(((1, 14),), SP(max_tokens=8, n=2, seed=3, stop=(stop,), echo=True))
  cut = teacher.run([job])[0]
  hit = next(c for c in cut if c.finish_reason == "stop" and c.stop_reason == stop)
  assert hit.text == "a" + text[: text.find(stop)]  # echo prepends the decoded prompt


def test_helpers():
  lengths = {m: engine.generation_length(m) for m in range(1, 3000)}
  assert all(m <= g and (g == 8 or g - m < max(8, m // 4 + 1)) for m, g in lengths.items())
  assert len({g for m, g in lengths.items() if 256 < m <= 512}) == 4  # 4 programs per octave
  assert engine.generation_length(50) == 56
  assert engine.first_stop("xabcab", ["ab", "abc", "q"]) == (1, "abc")  # tie: longest
  assert engine.first_stop("xyz", ["ab"]) is None


def test_local_backend_through_teacher_client(hf_model):
  backend = teacher_local.LocalBackend(hf_model[0], model="tl", max_batch=8)
  assert backend.name == "local" and backend.base_url == "local://tl"
  reqs = [
    tc.TeacherRequest(key=f"f{i}", prefix_text=p, num_samples=2, seed=i)
    for i, p in enumerate(["ab", "hello", "xy"])
  ] + [tc.TeacherRequest(key="long", prefix_text="a" * 60, num_samples=2, seed=0)]
  with tc.TeacherClient(backend, max_tokens=8, max_retries=0) as client:
    assert client.probe()["backend"] == "local"
    out = client.generate(reqs, timeout=120)
  backend.close()
  for samples in out[:3]:
    assert len(samples) == 2
    assert all(s.ok and s.mode == "raw" or "empty continuation" in s.error for s in samples)
  assert sum(s.ok for r in out[:3] for s in r) >= 5
  # The answers are serve's: an oversized prompt is a 400 with the server's reason.
  assert all("maximum context length is 64" in s.error for s in out[3])


def test_teacher_client_from_config_local(hf_model):
  cfg = dict(backend="local", model_path=hf_model[0], max_tokens=8)
  reqs = [tc.TeacherRequest(key="a", prefix_text="ab", num_samples=2, seed=0)]
  with tc.TeacherClient.from_config(cfg) as client:
    first = client.generate(reqs, timeout=120)
    again = client.generate(reqs, timeout=120)
  assert len(first[0]) == 2 and any(s.ok for s in first[0])
  assert [s.text for s in again[0]] == [s.text for s in first[0]]
