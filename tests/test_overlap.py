"""Overlap with the teacher (rollout.overlap_teacher): a row's teacher requests leave as the row
ends, with exactly the results of sending them after the whole decode. Real parts: a seeded fake
OpenAI-completions server on 127.0.0.1, the real TeacherClient, the continuous engine."""

import time

import jax
import numpy as np
import pytest
from fake_teacher_servers import FakeTeacher, ServerThread
from flax import nnx

from omniopd_jax import sharding
from omniopd_jax.configs import math as math_config
from omniopd_jax.experiments import demo_models
from omniopd_jax.methods import base, omniopd
from omniopd_jax.models import lm
from omniopd_jax.reward import similarity
from omniopd_jax.rollout import chunks, forks, sampler
from omniopd_jax.teacher import client as tc

QUESTIONS = ["1 + 2", "13 - 4 + 7", "5 + 5", "40 - 2 - 9", "8 + 1", "6 + 7 + 8", "2 - 1", "9 + 9"]


@pytest.fixture(scope="module")
def tokenizer():
  return demo_models.make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
  cfg = demo_models.model_config(
    tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8,
  )  # fmt: skip
  return lm.CausalLM(cfg, rngs=nnx.Rngs(0))


def _config(overlap: bool, engine="continuous", fork_method="peak", token_credit="none"):
  c = math_config.get_config("smoke")
  c.rollout.update(max_new_tokens=24, num_slots=2, page_size=4, steps_per_sync=4, engine=engine)
  c.rollout.overlap_teacher = overlap
  c.omniopd.update(num_forks=2, chunk_len=4, num_teacher_samples=2, fork_method=fork_method,
                   token_credit=token_credit)  # fmt: skip
  c.scoring.phi = "edit"
  c.max_prompt_len = 32
  return c


def _batch(tokenizer):
  texts = [f"Q: {q} =\nA: " for q in QUESTIONS]
  return {"prompt_ids": [tokenizer.encode(t) for t in texts],
          "examples": [{"question": q} for q in QUESTIONS]}  # fmt: skip


def _collect(config, tokenizer, model, server, ppr=1, step=3):
  client = tc.TeacherClient.from_config(
    dict(backend="openai_completions", base_url=server.url(), model="teacher", max_tokens=4,
         prompts_per_request=ppr)
  )  # fmt: skip
  ctx = base.Context(
    config=config, tokenizer=tokenizer, eos_ids=(tokenizer.eos_token_id,),
    rules=sharding.DEFAULT_RULES, rollout_mesh=None, process_index=0, teacher=client,
    scorer=similarity.make_scorer(config.scoring), backend="openai_completions",
  )  # fmt: skip
  try:
    return omniopd.collect(ctx, model, _batch(tokenizer), step)()
  finally:
    client.close()


def _assert_same(a: base.Collected, b: base.Collected):
  for x, y in zip(jax.tree.leaves(a.batch), jax.tree.leaves(b.batch)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert a.metrics.keys() == b.metrics.keys()
  for k in a.metrics:  # NaN-aware
    np.testing.assert_array_equal(a.metrics[k], b.metrics[k], err_msg=k)
  assert repr(a.texts) == repr(b.texts)
  assert a.teacher_samples == b.teacher_samples


@pytest.mark.parametrize("ppr, fork_method", [(1, "peak"), (3, "random")])
def test_overlapped_collection_equals_the_batch_path(tokenizer, model, ppr, fork_method):
  got, bodies = {}, {}
  for overlap in (True, False):
    teacher = FakeTeacher(seeded=True)
    with ServerThread(teacher) as server:
      got[overlap] = _collect(_config(overlap, fork_method=fork_method), tokenizer, model, server,
                              ppr=ppr)  # fmt: skip
      bodies[overlap] = sorted(entry["body"] for entry in teacher.log)
  _assert_same(got[True], got[False])
  assert got[True].metrics["omniopd/forks_sent"] >= 8  # rows, forks and teacher draws are real
  assert 0 < np.asarray(got[True].batch.fork_mask).sum()
  # The same HTTP calls (packed ones included: same prompts per call, same seeds).
  assert bodies[True] == bodies[False] and len(bodies[True]) * ppr >= 8


def test_token_credit_keeps_the_chunks_and_credits_their_tokens(tokenizer, model):
  """The same rollouts and teacher samples with token_credit none / decision: the chunk weights
  and masks are unchanged; every audited chunk's first token is spoken for by every sample that
  came back, and a later token only by samples that reproduce the chunk up to it."""
  got = {}
  for credit in ("none", "decision"):
    with ServerThread(FakeTeacher(seeded=True)) as server:
      got[credit] = _collect(_config(True, token_credit=credit), tokenizer, model, server)
  none, dec = got["none"].batch, got["decision"].batch
  np.testing.assert_array_equal(none.fork_mask, dec.fork_mask)
  np.testing.assert_array_equal(none.fork_weight, dec.fork_weight)
  assert none.fork_token_weight is None and dec.fork_token_weight.shape == (8, 2, 4)
  np.testing.assert_array_equal(dec.fork_token_mask[..., 0], dec.fork_mask)
  assert not (dec.fork_token_mask & ~dec.fork_mask[..., None]).any()
  # The fake teacher rarely reproduces a random student's chunk: later tokens are mostly unclaimed.
  assert dec.fork_token_mask[..., 1:].sum() < dec.fork_token_mask[..., 0].sum() * 3
  assert "omniopd/token_credit_frac" in got["decision"].metrics


def test_first_request_reaches_the_teacher_before_the_decode_ends(tokenizer, model, monkeypatch):
  decode_end = []
  real_generate = sampler.generate

  def timed_generate(*args, **kwargs):
    out = real_generate(*args, **kwargs)
    decode_end.append(time.monotonic())
    return out

  monkeypatch.setattr(sampler, "generate", timed_generate)
  teacher = FakeTeacher(seeded=True, latency_s=0.2)
  with ServerThread(teacher) as server:
    got = _collect(_config(True), tokenizer, model, server)
    first = min(entry["t"] for entry in teacher.log)
  # 8 rows in 2 slots: the first pair ends a quarter of the way into the decode.
  assert first < decode_end[0], (first, decode_end[0])
  assert got.metrics["omniopd/teacher_failures"] == 0
  with ServerThread(FakeTeacher(seeded=True)) as server:  # the static engine: after the decode
    static = _collect(_config(True, engine="static"), tokenizer, model, server)
  # Per-row keys: the static engine samples the same rows (its entropies may differ by ~1e-6,
  # so its forks are not compared).
  np.testing.assert_array_equal(static.batch.seq.tokens, got.batch.seq.tokens)
  assert static.metrics["omniopd/forks_sent"] > 0


def test_row_forks_and_requests_equal_the_whole_batch(tokenizer):
  rng = np.random.default_rng(0)
  b, length, m, c = 5, 20, 3, 4
  entropy = rng.random((b, length)).astype(np.float32)
  lengths = np.array([20, 3, 11, 4, 16])
  mask = np.arange(length)[None] < lengths[:, None]
  ids = rng.integers(3, 99, (b, length)).astype(np.int32)
  prompts = [rng.integers(3, 99, n).tolist() for n in (4, 7, 2, 9, 5)]
  key = jax.random.key(7)
  for method in ("peak", "random"):
    starts, valid = forks.select_forks(entropy, mask, num_forks=m, chunk_len=c, method=method,
                                       rng=key)  # fmt: skip
    whole, _ = chunks.build_fork_requests(tokenizer, prompts, ids, mask, starts, valid, chunk_len=c)
    parts = []
    for row in range(b):
      s, v = forks.select_row_forks(entropy[row], mask[row], np.int32(row), num_rows=b,
                                    num_forks=m, chunk_len=c, method=method, rng=key)  # fmt: skip
      np.testing.assert_array_equal(s, starts[row])
      np.testing.assert_array_equal(v, valid[row])
      parts.append(chunks.build_row_requests(tokenizer, prompts[row], ids[row], mask[row], s, v,
                                             row=row, num_rows=b, chunk_len=c))  # fmt: skip
    joined = chunks.join_requests(parts, (b, m))
    assert not valid[1].any() and valid.sum() > b  # a row with no room; rows with several forks
    for field in whole.__dataclass_fields__:
      x, y = getattr(joined, field), getattr(whole, field)
      if isinstance(x, list) and x and isinstance(x[0], np.ndarray):
        assert [a.tolist() for a in x] == [a.tolist() for a in y]
      else:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_loop_decodes_with_the_continuous_engine_on_its_mesh(tmp_path, monkeypatch):
  """train.loop (8-device data mesh): rollouts run the continuous engine, split over the mesh,
  and the OmniOPD collector sends each row's requests as it ends."""
  from omniopd_jax.train import loop

  seen, real_generate = [], sampler.generate

  def spy(*args, **kwargs):
    out = real_generate(*args, **kwargs)
    seen.append((kwargs.get("mesh") is not None, kwargs.get("on_row_done") is not None,
                 sampler.last_stats()))  # fmt: skip
    return out

  monkeypatch.setattr(sampler, "generate", spy)
  config = math_config.get_config("smoke")
  config.num_steps, config.checkpoint_every = 2, 0
  config.data.eval_size = config.eval.num_examples = config.eval.batch_size = 8
  config.rollout.update(num_slots=4, steps_per_sync=8)
  with ServerThread(FakeTeacher(seeded=True)) as server:
    config.teacher.update(base_url=server.url(), serve_local=False)
    final = loop.run(config, str(tmp_path))
  train = [stats for on_mesh, overlapped, stats in seen if overlapped]
  assert len(train) == 2 and all(on_mesh for on_mesh, *_ in seen)
  # 8 rows in 8 slots (4 rounded up to the 8 devices of the data axis), refilled by no one.
  assert all(s["engine"] == "continuous" and s["slots"] == 8 for s in train), train
  assert final["omniopd/forks_sent"] > 0 and np.isfinite(final["train/loss"])
