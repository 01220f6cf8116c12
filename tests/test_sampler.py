"""Sampler tests: greedy parity with transformers' generate, log-probs and entropies against a
teacher-forced pass, EOS handling, seeds, top-k/top-p, and compile-once behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from omniopd_jax.models import hf
from omniopd_jax.rollout import sampler

VOCAB = 96
FAMILIES = ("llama", "qwen2", "qwen3")


def _hf_config(family):
  common = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    # A wide init gives peaked next-token distributions: greedy ties are then far apart and the
    # top-k/top-p sets are small enough for the filter tests to bite.
    initializer_range=0.3,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
  )
  if family == "llama":
    rope = dict(
      rope_type="llama3",
      rope_theta=10000.0,
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=16,  # small, so the scaling changes these positions
    )
    return transformers.LlamaConfig(rope_parameters=rope, **common)
  if family == "qwen2":
    return transformers.Qwen2Config(tie_word_embeddings=True, **common)
  return transformers.Qwen3Config(head_dim=16, **common)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """family -> (torch model, our model), same random weights through a safetensors directory."""
  out = {}
  for i, family in enumerate(FAMILIES):
    torch.manual_seed(i)
    cfg = _hf_config(family)
    torch_model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    path = str(tmp_path_factory.mktemp(family))
    torch_model.save_pretrained(path)
    ours, _ = hf.load_pretrained(path)
    torch_model.generation_config.eos_token_id = None  # run to max_new_tokens, as we do
    out[family] = (torch_model, ours)
  return out


def _prompts(seed=0, lengths=(3, 9, 14)):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, VOCAB, n).tolist() for n in lengths]


def _left_pad(seqs):
  width = max(len(s) for s in seqs)
  ids = torch.tensor([[0] * (width - len(s)) + list(s) for s in seqs])
  mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
  return ids, mask


def _torch_greedy(torch_model, prompts, max_new_tokens):
  ids, mask = _left_pad(prompts)
  with torch.no_grad():
    out = torch_model.generate(
      input_ids=ids,
      attention_mask=mask,
      do_sample=False,
      max_new_tokens=max_new_tokens,
      pad_token_id=0,
    )
  return out[:, ids.shape[1] :].numpy()


def _teacher_forced(torch_model, prompts, rollout):
  """log p(token) and entropy at each generated position, from one torch forward pass (float64)."""
  seqs = [list(p) + r[m].tolist() for p, r, m in zip(prompts, rollout.tokens, rollout.mask)]
  ids, mask = _left_pad(seqs)
  with torch.no_grad():
    logits = torch_model(input_ids=ids, attention_mask=mask).logits.double()
  logp = torch.log_softmax(logits, -1).numpy()
  lp, ent = np.zeros(rollout.tokens.shape), np.zeros(rollout.tokens.shape)
  width = ids.shape[1]
  for b, m in enumerate(rollout.mask):
    n = int(m.sum())
    start = width - n - 1  # the logits at the last prompt token predict generated token 0
    rows = logp[b, start : start + n]  # [n, V]
    lp[b, :n] = rows[np.arange(n), rollout.tokens[b, :n]]
    ent[b, :n] = -(np.exp(rows) * rows).sum(-1)
  return lp, ent, logp


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(models, family):
  torch_model, ours = models[family]
  prompts = _prompts(lengths=(3, 9, 14, 1))
  expected = _torch_greedy(torch_model, prompts, 12)
  out = sampler.generate(ours, prompts, max_new_tokens=12, temperature=0.0)
  np.testing.assert_array_equal(out.tokens, expected)
  assert out.mask.all() and out.tokens.dtype == np.int32
  lp, ent, _ = _teacher_forced(torch_model, prompts, out)
  np.testing.assert_allclose(out.logprobs, lp, atol=1e-4)
  np.testing.assert_allclose(out.entropy, ent, atol=1e-4)
  assert out.logprobs.dtype == np.float32 and out.entropy.dtype == np.float32


def test_rows_stop_at_eos_independently_and_the_loop_exits_early(models):
  _, ours = models["llama"]
  prompts = _prompts(lengths=(3, 9, 14, 1))  # the greedy-parity shapes: no new compile
  free = sampler.generate(ours, prompts, max_new_tokens=12, temperature=0.0)
  eos = {
    int(free.tokens[0, 4]),
    int(free.tokens[1, 2]),
    int(free.tokens[2, 3]),
    int(free.tokens[3, 1]),
  }
  options = sampler.SamplingOptions(12, temperature=0.0, eos_ids=tuple(eos), pad_id=7)
  fn = sampler.make_generate_fn(nnx.graphdef(ours), options)
  out = fn(nnx.state(ours), *sampler.pad_prompts(prompts), np.uint32(0))
  out = sampler.Rollout(*(np.asarray(out[k])[: len(prompts)] for k in sampler.Rollout._fields))
  stops = []
  for row_free, row, mask in zip(free.tokens, out.tokens, out.mask):
    hits = np.flatnonzero(np.isin(row_free, list(eos)))
    n = hits[0] + 1 if len(hits) else len(row_free)
    stops.append(n)
    np.testing.assert_array_equal(mask, np.arange(len(row)) < n)
    np.testing.assert_array_equal(row[:n], row_free[:n])
    assert (row[n:] == 7).all()
  assert (out.logprobs[~out.mask] == 0).all() and (out.entropy[~out.mask] == 0).all()
  assert stops[0] <= 5 and stops[1] <= 3 and stops[2] <= 4 and stops[3] <= 2
  # Once every row has finished, the decode loop stops.
  steps = int(fn(nnx.state(ours), *sampler.pad_prompts(prompts), np.uint32(0))["steps"])
  assert steps == max(stops) < 12


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_logprobs_and_entropy_match_teacher_forcing(models, family):
  torch_model, ours = models[family]
  prompts = _prompts(3)
  out = sampler.generate(ours, prompts, max_new_tokens=10, temperature=0.8, seed=5, eos_ids=[2])
  lp, ent, _ = _teacher_forced(torch_model, prompts, out)
  np.testing.assert_allclose(out.logprobs, lp, atol=1e-4)
  np.testing.assert_allclose(out.entropy, ent, atol=1e-4)


def test_seeds(models):
  _, ours = models["qwen3"]
  prompts = _prompts(4)
  kw = dict(max_new_tokens=10, temperature=0.8, eos_ids=[2])  # as above: no new compile
  a = sampler.generate(ours, prompts, seed=3, **kw)
  b = sampler.generate(ours, prompts, seed=3, **kw)
  c = sampler.generate(ours, prompts, seed=4, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.tokens != c.tokens).any()


def _nucleus(logits, top_k, top_p):
  """Brute-force reference: the set of token ids the filters keep, per row."""
  keep = []
  for row in np.asarray(logits, np.float64):
    order = np.argsort(-row, kind="stable")
    if top_k:
      order = order[:top_k]
    probs = np.exp(row[order] - row[order].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    keep.append(set(order[before < top_p].tolist()))
  return keep


def test_filter_logits_matches_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
  for top_k, top_p in [(5, 1.0), (0, 0.6), (7, 0.5), (0, 0.05), (50, 1.0)]:
    filtered = np.asarray(sampler.filter_logits(jnp.asarray(logits), top_k, top_p))
    kept = [set(np.flatnonzero(np.isfinite(r)).tolist()) for r in filtered]
    assert kept == _nucleus(logits, top_k, top_p), (top_k, top_p)
    np.testing.assert_array_equal(filtered[np.isfinite(filtered)], logits[np.isfinite(filtered)])


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5)])
def test_top_k_top_p_honoured(models, top_k, top_p):
  torch_model, ours = models["llama"]
  prompts = _prompts(5, lengths=(5, 8))
  seen = set()
  for seed in range(3):
    out = sampler.generate(
      ours, prompts, max_new_tokens=8, temperature=1.0, top_k=top_k, top_p=top_p, seed=seed
    )
    _, _, logp = _teacher_forced(torch_model, prompts, out)
    width = logp.shape[1]
    for b in range(len(prompts)):
      rows = logp[b, width - 9 : width - 1]  # [8, V] distributions of the 8 generated tokens
      allowed = _nucleus(rows, top_k, top_p)
      for t, token in enumerate(out.tokens[b]):
        assert token in allowed[t], (b, t, token, allowed[t])
        seen.add((b, t, int(token)))
  # The filters must still leave room for randomness: different seeds pick different tokens.
  assert len(seen) > 2 * 8


@pytest.mark.parametrize("engine,new_programs", [("static", 1), ("continuous", 2)])
def test_compiles_once_per_bucket(models, engine, new_programs):
  _, ours = models["qwen3"]
  kw = dict(max_new_tokens=6, temperature=0.7, top_k=5, eos_ids=[2], engine=engine)
  sampler.generate(ours, _prompts(6, (3, 5, 7)), seed=0, **kw)
  before = sampler.num_traces()
  # Same buckets (3 -> 4 rows, <=16 tokens): other prompts, seeds and parameter values.
  sampler.generate(ours, _prompts(7, (2, 16, 4, 1)), seed=1, **kw)
  graphdef, state = nnx.split(ours)
  changed = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.5, state))
  a = sampler.generate(changed, _prompts(6, (3, 5, 7)), seed=0, **kw)
  assert sampler.num_traces() == before
  b = sampler.generate(ours, _prompts(6, (3, 5, 7)), seed=0, **kw)
  assert (a.logprobs != b.logprobs).any()  # the new values were really used
  # A longer prompt bucket: one new program (continuous: its prefill and a wider decode window).
  sampler.generate(ours, _prompts(8, (20,)), seed=0, **kw)
  assert sampler.num_traces() == before + new_programs


def test_draft_chunks_share_one_prefill(models):
  torch_model, ours = models["qwen2"]
  prefixes = _prompts(9, (6, 11))
  drafts = sampler.draft_chunks(ours, prefixes, num_drafts=4, chunk_len=6, seed=1)
  assert drafts.tokens.shape == drafts.logprobs.shape == (2, 4, 6)
  assert all(len({tuple(d) for d in drafts.tokens[i]}) > 1 for i in range(2))
  # Each draft is a proper sample continuing its own prefix (the repeated cache is right).
  flat = sampler.Rollout(*(x.reshape(8, 6) for x in drafts))
  lp, ent, _ = _teacher_forced(torch_model, [p for p in prefixes for _ in range(4)], flat)
  np.testing.assert_allclose(flat.logprobs, lp, atol=1e-4)
  np.testing.assert_allclose(flat.entropy, ent, atol=1e-4)


def test_buckets_and_padding():
  assert sampler.bucket(1, sampler.PROMPT_BUCKETS) == 16
  assert sampler.bucket(49, sampler.PROMPT_BUCKETS) == 64
  assert sampler.bucket(5000, sampler.PROMPT_BUCKETS) == 6144
  assert sampler.bucket(3, sampler.BATCH_BUCKETS, multiple=8) == 8
  tokens, mask = sampler.pad_prompts([[5, 6], [7]], pad_id=9)
  assert tokens.shape == (2, 16)
  np.testing.assert_array_equal(tokens[:, -2:], [[5, 6], [9, 7]])
  np.testing.assert_array_equal(mask.sum(1), [2, 1])
  with pytest.raises(ValueError, match="empty"):
    sampler.pad_prompts([[1], []])
  with pytest.raises(ValueError, match="cannot hold"):
    sampler.pad_prompts([[1, 2, 3]], prompt_len=2)
  with pytest.raises(ValueError, match="top_p"):
    sampler.SamplingOptions(4, top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    sampler.SamplingOptions(4, temperature=-1.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampler.SamplingOptions(0)


SMOLLM2_PROMPTS = ["What is 12 + 30?", "Name a prime number larger than 10."]


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_dir):
  ours, tokenizer = hf.load_pretrained(smollm2_dir)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
    smollm2_dir, dtype=torch.float32
  ).eval()
  torch_model.generation_config.eos_token_id = None
  prompts = [
    tokenizer.apply_chat_template(
      [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    for text in SMOLLM2_PROMPTS
  ]
  expected = _torch_greedy(torch_model, prompts, 12)
  out = sampler.generate(ours, prompts, max_new_tokens=12, temperature=0.0)
  np.testing.assert_array_equal(out.tokens, expected)
  lp, ent, _ = _teacher_forced(torch_model, prompts, out)
  np.testing.assert_allclose(out.logprobs, lp, atol=1e-4)
  np.testing.assert_allclose(out.entropy, ent, atol=1e-4)
