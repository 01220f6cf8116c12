"""Continuous batching: refilled slots, per-row caps, layout-independent samples, the completion
callback and compile-once behaviour, against the static engine and a teacher-forced forward."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from omniopd_jax import sharding
from omniopd_jax.models import lm
from omniopd_jax.rollout import continuous, decode_sharding, rows, sampler

VOCAB = 64
EOS = [2, 3, 4, 5, 6]  # several, so that sampled rows end early too


def _model(scan_layers=False):
  cfg = lm.ModelConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, architecture="qwen3",
    qk_norm=True, rope_theta=10000.0, scan_layers=scan_layers,
  )  # fmt: skip
  model = lm.CausalLM(cfg, rngs=nnx.Rngs(0))
  # Wider weights than the default init: peaked distributions, so EOS ends some rows early.
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, nnx.map_state(lambda _, x: x * 6.0, state))


@pytest.fixture(scope="module")
def model():
  return _model()


def _prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, VOCAB, n).tolist() for n in lengths]


PROMPTS = _prompts(0, (3, 9, 20, 1, 5, 17, 12, 2))
CAPS = [5, 14, 3, 14, 7, 1, 14, 9]
SMALL = continuous.EngineOptions(num_slots=3, page_size=4, steps_per_sync=3)


def _teacher_forced(model, prompts, rollout):
  """log p(token), entropy at each generated position from one full forward pass (float64)."""
  lp, ent = np.zeros(rollout.tokens.shape), np.zeros(rollout.tokens.shape)
  for b, (prompt, row, mask) in enumerate(zip(prompts, rollout.tokens, rollout.mask)):
    seq = np.asarray(list(prompt) + row[mask].tolist())[None]
    logits = np.asarray(model(seq), np.float64)[0]  # [T, V]
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # [T, V]
    n = int(mask.sum())
    rows = logp[len(prompt) - 1 : len(prompt) - 1 + n]  # [n, V]
    lp[b, :n] = rows[np.arange(n), row[:n]]
    ent[b, :n] = -(np.exp(rows) * rows).sum(-1)
  return lp, ent


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_refilled_slots_match_the_static_engine(model, temperature):
  kw = dict(max_new_tokens=14, temperature=temperature, eos_ids=EOS, seed=3)
  static = sampler.generate(model, PROMPTS, engine="static", max_new_tokens_per_row=CAPS, **kw)
  ours = sampler.generate(model, PROMPTS, engine_options=SMALL, max_new_tokens_per_row=CAPS, **kw)
  np.testing.assert_array_equal(ours.tokens, static.tokens)
  np.testing.assert_array_equal(ours.mask, static.mask)
  np.testing.assert_allclose(ours.logprobs, static.logprobs, atol=1e-4)
  lengths = ours.mask.sum(1)
  assert (lengths <= CAPS).all() and (lengths == CAPS).any() and (lengths < CAPS).any()
  for row, n, cap in zip(ours.tokens, lengths, CAPS):  # a row ends at its cap or its first EOS
    assert not np.isin(row[: n - 1], EOS).any() and (n == cap or row[n - 1] in EOS)
  lp, ent = _teacher_forced(model, PROMPTS, ours)
  np.testing.assert_allclose(ours.logprobs, lp, atol=1e-4)
  np.testing.assert_allclose(ours.entropy, ent, atol=1e-4)
  assert (ours.tokens[~ours.mask] == 0).all() and (ours.logprobs[~ours.mask] == 0).all()


def test_scanned_layers_sample_the_same_rows(model):
  """scan_layers=True (same weights, stacked): both engines, their stacked dense and paged caches
  included, give the unrolled model's rows."""
  scanned = _model(scan_layers=True)
  assert scanned.config.scan_layers
  # The arguments of two tests above (their unrolled programs are reused); K=2 samples share pages.
  static = dict(engine="static", max_new_tokens=14, temperature=1.0, eos_ids=EOS, seed=3,
                max_new_tokens_per_row=CAPS)  # fmt: skip
  paged = dict(max_new_tokens=10, temperature=1.0, eos_ids=EOS, seed=11, num_samples=2)
  for kw in (static, paged):
    want = sampler.generate(model, PROMPTS, **kw)
    got = sampler.generate(scanned, PROMPTS, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)  # weights x 6


def test_rows_do_not_depend_on_slot_batch_or_neighbours(model):
  kw = dict(max_new_tokens=10, temperature=1.0, eos_ids=EOS, seed=11, num_samples=2)
  full = sampler.generate(model, PROMPTS, **kw)
  pick = [6, 1, 3]  # other order, other neighbours, fewer slots
  other = PROMPTS[:1] + [PROMPTS[i] for i in pick] + _prompts(5, (4, 8))
  for options in (SMALL, continuous.EngineOptions(num_slots=2, page_size=8, steps_per_sync=5)):
    part = sampler.generate(model, other, engine_options=options, **kw)
    for j, i in enumerate([0] + pick):
      for k in range(2):
        np.testing.assert_array_equal(part.tokens[2 * j + k], full.tokens[2 * i + k])
        np.testing.assert_allclose(part.logprobs[2 * j + k], full.logprobs[2 * i + k], atol=1e-4)
  # The K samples of a prompt differ; a repeated prompt gets fresh samples, not copies.
  assert (full.tokens[0] != full.tokens[1]).any()
  twice = sampler.generate(model, [PROMPTS[2], PROMPTS[2]], **dict(kw, num_samples=1))
  np.testing.assert_array_equal(twice.tokens[0], full.tokens[4])
  np.testing.assert_array_equal(twice.tokens[1], full.tokens[5])


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_per_prompt_seeds_serve_several_calls_in_one(model, engine):
  # What the teacher server does: requests with their own seeds gathered into one call. Each
  # prompt's rows are those of its own call; a prompt repeated under one seed still counts as a
  # repeat, the same prompt under another seed does not.
  kw = dict(max_new_tokens=10, temperature=1.0, eos_ids=EOS, num_samples=2, engine=engine)
  a = sampler.generate(model, [PROMPTS[0], PROMPTS[0]], seed=5, **kw)
  b = sampler.generate(model, [PROMPTS[0], PROMPTS[1]], seed=6, **kw)
  both = sampler.generate(model, [PROMPTS[0]] * 3 + [PROMPTS[1]], seed=[5, 5, 6, 6], **kw)
  np.testing.assert_array_equal(both.tokens, np.concatenate([a.tokens, b.tokens]))
  np.testing.assert_array_equal(both.mask, np.concatenate([a.mask, b.mask]))
  assert (a.tokens[0] != b.tokens[0]).any() and (a.tokens[0] != a.tokens[2]).any()
  with pytest.raises(ValueError, match="one per prompt"):
    sampler.generate(model, PROMPTS[:2], seed=[1, 2, 3], **kw)
  with pytest.raises(ValueError, match="one per prompt"):  # too few: never a silent seed 0
    sampler.generate(model, PROMPTS[:3], seed=[1, 2], **kw)


def test_samples_share_prompt_pages_and_a_tight_pool_still_finishes(model):
  kw = dict(max_new_tokens=12, temperature=1.0, eos_ids=EOS, seed=2, num_samples=3)
  prompts = _prompts(7, (9, 14, 6, 11))
  roomy = sampler.generate(model, prompts, **kw)
  # 3 slots; 4-token pages; the pool holds about one prompt's group at a time.
  tight = continuous.EngineOptions(num_slots=3, page_size=4, steps_per_sync=2, num_pages=16)
  out = sampler.generate(model, prompts, engine_options=tight, **kw)
  np.testing.assert_array_equal(out.tokens, roomy.tokens)
  np.testing.assert_array_equal(out.mask, roomy.mask)
  lp, _ = _teacher_forced(model, [p for p in prompts for _ in range(3)], out)
  np.testing.assert_allclose(out.logprobs, lp, atol=1e-4)
  too_small = continuous.EngineOptions(num_slots=3, page_size=4, num_pages=4)
  with pytest.raises(MemoryError, match="pool"):
    sampler.generate(model, prompts, engine_options=too_small, **kw)


def test_row_done_callback_reports_rows_as_they_end(model):
  seen = []
  caps = [1, 14, 14, 3, 14, 9, 14, 14]
  out = sampler.generate(
    model, PROMPTS, max_new_tokens=14, temperature=0.0, max_new_tokens_per_row=caps,
    eos_ids=EOS, engine_options=continuous.EngineOptions(num_slots=8, page_size=4, steps_per_sync=4),
    on_row_done=lambda row, *arrays: seen.append((row, *arrays)),
  )  # fmt: skip
  assert sorted(r for r, *_ in seen) == list(range(len(PROMPTS)))
  # All rows start together; a row of n tokens ends in decode call max(1, ceil((n - 1) / 4)) and
  # is reported right after that call, while the longer rows still decode.
  calls = [max(1, -(-(int(out.mask[r].sum()) - 1) // 4)) for r, *_ in seen]
  assert calls == sorted(calls) and calls[0] == 1 and len(set(calls)) > 2, calls
  for row, tokens, logprobs, entropy in seen:
    n = int(out.mask[row].sum())
    np.testing.assert_array_equal(tokens, out.tokens[row, :n])
    np.testing.assert_array_equal(logprobs, out.logprobs[row, :n])
    np.testing.assert_array_equal(entropy, out.entropy[row, :n])


def test_new_prompts_caps_and_seeds_do_not_recompile(model):
  kw = dict(max_new_tokens=12, temperature=1.0, eos_ids=EOS, engine_options=SMALL)
  sampler.generate(model, _prompts(1, (3, 7, 12, 4, 9)), seed=0, **kw)
  before = sampler.num_traces()
  for seed in range(3):
    rng = np.random.default_rng(seed)
    prompts = _prompts(seed + 10, rng.integers(1, 17, 5))
    caps = rng.integers(1, 13, 5)
    sampler.generate(model, prompts, seed=seed, max_new_tokens_per_row=caps, **kw)
  # Only new page-window or admission buckets may compile, and each at most once.
  assert sampler.num_traces() - before <= 3
  again = sampler.num_traces()
  sampler.generate(model, _prompts(1, (3, 7, 12, 4, 9)), seed=5, **kw)
  assert sampler.num_traces() == again


def test_engine_options_from_config():
  from omniopd_jax.configs import math as config_lib

  r = config_lib.get_config().rollout
  r.num_slots, r.page_size = 12, 8
  assert continuous.EngineOptions.from_config(r) == continuous.EngineOptions(12, 8)
  assert r.engine in sampler.ENGINES and r.decode_layout == "auto"


def test_bad_arguments():
  with pytest.raises(ValueError, match="max_new_tokens_per_row"):
    rows.row_caps([3, 0], 2, 1, 8)
  with pytest.raises(ValueError, match="max_new_tokens_per_row"):
    rows.row_caps([3, 9], 2, 1, 8)
  np.testing.assert_array_equal(rows.row_caps([3, 5], 2, 2, 8), [3, 3, 5, 5])
  with pytest.raises(ValueError, match="attention"):
    continuous.EngineOptions(attention="flash")
  with pytest.raises(ValueError, match="engine"):
    sampler.generate(None, [[1]], max_new_tokens=2, engine="dynamic")


def _capture_decode(engine):
  """Wraps engine._decode to keep the abstract arguments of its first call (for .lower)."""
  real, seen = engine._decode, []

  def spy(*args):
    if not seen:
      abstract = lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None)
      )  # noqa: E731, E501
      seen.append(jax.tree.map(lambda x: abstract(x) if hasattr(x, "shape") else x, args))
    return real(*args)

  engine._decode = spy
  return real, seen


@pytest.mark.parametrize("layout, temperature, k", [("tensor", 0.0, 1), ("replicated", 1.0, 2)])
def test_on_a_mesh_slots_split_over_devices_give_the_same_rows(model, layout, temperature, k):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  # Per-row keys: a row's samples do not depend on the layout. (The single-device runs are those
  # of the tests above: their programs are already compiled.)
  length = 14 if k == 1 else 10
  kw = dict(max_new_tokens=length, temperature=temperature, eos_ids=EOS, seed=3, num_samples=k,
            engine_options=SMALL, max_new_tokens_per_row=np.minimum(CAPS, length))  # fmt: skip
  alone = sampler.generate(model, PROMPTS, **kw)
  seen = []
  ours = sampler.generate(model, PROMPTS, mesh=mesh, decode_layout=layout,
                          on_row_done=lambda row, *_: seen.append(row), **kw)  # fmt: skip
  stats = sampler.last_stats()
  assert stats["engine"] == "continuous" and stats["slots"] == 4  # 3 rounded up to 2 x 2
  assert stats["prefill_calls"] > 1 and sorted(seen) == list(range(len(PROMPTS) * k))
  np.testing.assert_array_equal(ours.tokens, alone.tokens)
  np.testing.assert_array_equal(ours.mask, alone.mask)
  np.testing.assert_allclose(ours.logprobs, alone.logprobs, atol=1e-4)
  np.testing.assert_allclose(ours.entropy, alone.entropy, atol=1e-4)


def test_mesh_decode_gathers_no_weights(model):
  """Replicated weights, slots over 8 devices: the compiled decode step moves only each step's
  new keys/values, tokens and loop flags, never a weight; no float all-reduce."""
  mesh = sharding.make_mesh([("data", 4), ("fsdp", 2), ("tensor", 1)])
  kw = dict(
    max_new_tokens=10,
    temperature=1.0,
    eos_ids=EOS,
    seed=1,
    mesh=mesh,
    engine_options=continuous.EngineOptions(num_slots=8, page_size=4, steps_per_sync=4),
  )
  sampler.generate(model, PROMPTS, **kw)  # builds the engine
  (engine,) = [e for key, e in sampler._ENGINES.items() if key[3] == mesh]
  real, seen = _capture_decode(engine)
  try:
    sampler.generate(model, PROMPTS, **kw)
  finally:
    engine._decode = real
  hlo = real.lower(*seen[0]).compile().as_text()
  counts = decode_sharding.count_collectives(hlo)
  assert counts["all-gather"] > 0, counts  # the new K/V of each layer do move: pages replicated
  cfg = model.config
  largest = 8 * max(cfg.num_key_value_heads * cfg.dim_per_head, 10)  # [S, KV, D] or [S, L]
  smallest_weight = min(x.size for x in jax.tree.leaves(nnx.state(model)) if x.ndim > 1)
  assert largest < smallest_weight
  for line in hlo.splitlines():
    m = re.search(r"= (\w+)\[([\d,]*)\]\{?[^=]*? (all-gather|all-reduce)(-start)?\(", line)
    if not m:
      continue
    size = int(np.prod([int(d) for d in m.group(2).split(",") if d]))
    assert size <= largest, line  # never a weight
    if m.group(3) == "all-reduce":
      assert m.group(1) in ("pred", "s32"), line  # only the loop's exit test


def test_a_replicated_pool_too_big_for_the_device_falls_back_to_the_static_engine(
  model, monkeypatch, capsys
):
  # Under a mesh the page pool sits on every device: when it would take more than POOL_SHARE of a
  # device's memory, generate says so and decodes with the static engine (rows sharded), calling
  # on_row_done for every row after the decode; the rows are the same.
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  cfg, dtype = model.config, model.dtype
  assert continuous.replicated_pool_fits(cfg, dtype, SMALL, 3, 40)  # CPU reports no memory limit

  class Device:
    def memory_stats(self):
      return {"bytes_limit": 1024}

  monkeypatch.setattr(continuous.jax, "devices", lambda *a: [Device()])
  assert not continuous.replicated_pool_fits(cfg, dtype, SMALL, 3, 40)
  kw = dict(max_new_tokens=8, temperature=0.0, eos_ids=EOS, seed=3, engine_options=SMALL)
  seen = []
  ours = sampler.generate(model, PROMPTS, mesh=mesh, on_row_done=lambda row, *_: seen.append(row),
                          **kw)  # fmt: skip
  assert sampler.last_stats()["engine"] == "static" and sorted(seen) == list(range(len(PROMPTS)))
  assert "decoding with the static engine" in capsys.readouterr().out
  monkeypatch.undo()
  np.testing.assert_array_equal(ours.tokens, sampler.generate(model, PROMPTS, **kw).tokens)
