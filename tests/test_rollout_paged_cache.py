"""Paged KV cache: the page pool, page writes, and ragged decode attention (pure JAX and the Pallas
kernels in interpret mode) against a brute-force numpy reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omniopd_jax.models import layer_scan, lm
from omniopd_jax.rollout import continuous, paged_cache, sampler

S, H, KV, D, PS, NP, W = 3, 4, 2, 16, 4, 16, 4


def _random_cache(seed=0, lengths=(5, 16, 1)):
  rng = np.random.default_rng(seed)
  k = rng.normal(size=(KV, NP, PS, D)).astype(np.float32)
  v = rng.normal(size=(KV, NP, PS, D)).astype(np.float32)
  table = (rng.permutation(NP - 1)[: S * W].reshape(S, W) + 1).astype(np.int32)
  q = rng.normal(size=(S, H, D)).astype(np.float32)
  return q, k, v, table, np.asarray(lengths, np.int32)


def _reference(q, k, v, table, lengths):
  """Attention of each row over its first `lengths` tokens, read token by token (float64)."""
  out = np.zeros(q.shape)
  for s in range(len(q)):
    n = lengths[s]
    pos = np.arange(n)
    keys = k[:, table[s, pos // PS], pos % PS].astype(np.float64)  # [KV, n, D]
    values = v[:, table[s, pos // PS], pos % PS].astype(np.float64)
    for h in range(q.shape[1]):
      g = h // (q.shape[1] // k.shape[0])
      scores = keys[g] @ q[s, h]
      p = np.exp(scores - scores.max())
      out[s, h] = (p / p.sum()) @ values[g]
  return out


def test_ragged_decode_attention_matches_reference():
  q, k, v, table, lengths = _random_cache()
  out = paged_cache.ragged_decode_attention(*map(jnp.asarray, (q, k, v, table, lengths)))
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, table, lengths), atol=1e-5)


def test_pages_past_a_row_length_are_never_read():
  q, k, v, table, lengths = _random_cache(1)
  out = paged_cache.ragged_decode_attention(*map(jnp.asarray, (q, k, v, table, lengths)))
  for s, n in enumerate(lengths):  # poison every slot past each row's length
    for t in range(n, W * PS):
      k[:, table[s, t // PS], t % PS] = v[:, table[s, t // PS], t % PS] = 1e30
  poisoned = paged_cache.ragged_decode_attention(*map(jnp.asarray, (q, k, v, table, lengths)))
  np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(out))


def test_write_and_attend_puts_the_new_token_at_its_page_and_offset():
  q, k, v, table, lengths = _random_cache(2, lengths=(5, 15, 0))
  rng = np.random.default_rng(3)
  new_k, new_v = rng.normal(size=(2, S, 1, KV, D)).astype(np.float32)
  cache = paged_cache.PagedKVCache(*map(jnp.asarray, (k, v, table, lengths)))
  out, cache = cache.write_and_attend(jnp.asarray(q[:, None]), new_k, new_v, scale=0.5)
  for s, n in enumerate(lengths):
    np.testing.assert_array_equal(
      np.asarray(cache.k_pages)[:, table[s, n // PS], n % PS], new_k[s, 0]
    )
    k[:, table[s, n // PS], n % PS], v[:, table[s, n // PS], n % PS] = new_k[s, 0], new_v[s, 0]
  expected = _reference(q * 0.5, k, v, table, lengths + 1)
  np.testing.assert_allclose(np.asarray(out[:, 0]), expected, atol=1e-5)


def test_write_prompt_pages_left_aligns_a_left_padded_prefill():
  rng = np.random.default_rng(4)
  a, p = 2, 6
  dense_k = rng.normal(size=(a, KV, D, p)).astype(np.float32)  # [A, KV, D, P], as init_cache
  dense_v = rng.normal(size=(a, KV, p, D)).astype(np.float32)
  prompt_len = np.asarray([6, 3], np.int32)
  page_ids = np.asarray([[3, 7], [5, 0]], np.int32)  # row 1 needs one page; 0 = the null page
  pages = paged_cache.init_pages(1, KV, D, NP, PS, jnp.float32)
  ((k_pages, v_pages),) = paged_cache.write_prompt_pages(
    pages, [(jnp.asarray(dense_k), jnp.asarray(dense_v))], jnp.asarray(prompt_len), page_ids
  )
  k_pages, v_pages = np.asarray(k_pages), np.asarray(v_pages)
  for row in range(a):
    for t in range(prompt_len[row]):
      src = p - prompt_len[row] + t
      page, off = page_ids[row, t // PS], t % PS
      np.testing.assert_array_equal(k_pages[:, page, off], dense_k[row, :, :, src])
      np.testing.assert_array_equal(v_pages[:, page, off], dense_v[row, :, src])


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_stacked_pages_write_and_attend_like_that_layers_own_pages(impl):
  """scan_layers: pages [KV, L, NP, ps, D] with `layer` set equal that layer's [KV, NP, ps, D]
  cache, and the write lands in that layer only."""
  layers = [_random_cache(seed, lengths=(5, 15, 0)) for seed in (5, 6, 7)]
  q, _, _, table, lengths = layers[1]
  k_all = np.stack([k for _, k, _, _, _ in layers], axis=1)  # [KV, L, NP, ps, D]
  v_all = np.stack([v for _, _, v, _, _ in layers], axis=1)
  new_k, new_v = np.random.default_rng(8).normal(size=(2, S, 1, KV, D)).astype(np.float32)
  kw = dict(impl=impl, interpret=impl != "xla")
  own = paged_cache.PagedKVCache(
    *map(jnp.asarray, (k_all[:, 1], v_all[:, 1], table, lengths)), **kw
  )
  stacked = paged_cache.PagedKVCache(
    *map(jnp.asarray, (k_all, v_all, table, lengths)), **kw, layer=jnp.int32(1)
  )
  want, own = own.write_and_attend(jnp.asarray(q[:, None]), new_k, new_v, scale=0.5)
  got, stacked = stacked.write_and_attend(jnp.asarray(q[:, None]), new_k, new_v, scale=0.5)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(stacked.k_pages)[:, 1], np.asarray(own.k_pages))
  np.testing.assert_array_equal(np.asarray(stacked.v_pages)[:, 1], np.asarray(own.v_pages))
  for other in (0, 2):  # untouched
    np.testing.assert_array_equal(np.asarray(stacked.k_pages)[:, other], k_all[:, other])


def test_stacked_write_prompt_pages_equals_per_layer():
  rng = np.random.default_rng(9)
  n_layers, a, p = 3, 2, 6
  dense_k = rng.normal(size=(n_layers, a, KV, D, p)).astype(np.float32)
  dense_v = rng.normal(size=(n_layers, a, KV, p, D)).astype(np.float32)
  prompt_len, page_ids = jnp.asarray([6, 3], jnp.int32), np.asarray([[3, 7], [5, 0]], np.int32)
  per_layer = paged_cache.write_prompt_pages(
    paged_cache.init_pages(n_layers, KV, D, NP, PS, jnp.float32),
    [(jnp.asarray(k), jnp.asarray(v)) for k, v in zip(dense_k, dense_v)], prompt_len, page_ids,
  )  # fmt: skip
  stacked = paged_cache.write_prompt_pages(
    paged_cache.init_pages(n_layers, KV, D, NP, PS, jnp.float32, stacked=True),
    layer_scan.StackedKVCache(jnp.asarray(dense_k), jnp.asarray(dense_v)), prompt_len, page_ids,
  )  # fmt: skip
  assert isinstance(stacked, tuple) and stacked[0].shape == (KV, n_layers, NP, PS, D)
  for i, (k_pages, v_pages) in enumerate(per_layer):
    np.testing.assert_array_equal(np.asarray(stacked[0])[:, i], np.asarray(k_pages))
    np.testing.assert_array_equal(np.asarray(stacked[1])[:, i], np.asarray(v_pages))


def test_page_pool_counts_references():
  pool = paged_cache.PagePool(num_pages=5, page_size=PS)
  a = pool.alloc(2)
  assert 0 not in a and pool.num_free == 2
  pool.retain(a)  # a second sample shares them
  pool.release(a)
  assert pool.num_free == 2  # still held by the first
  pool.release(a)
  assert pool.num_free == 4
  with pytest.raises(MemoryError, match="exhausted"):
    pool.alloc(5)
  with pytest.raises(ValueError, match="released"):
    pool.release(a)
  with pytest.raises(ValueError, match="null page"):
    paged_cache.PagePool(num_pages=1, page_size=PS)


def test_pallas_gpu_kernel_in_interpret_mode_matches_reference():
  q, k, v, table, lengths = _random_cache(5)
  out = paged_cache.pallas_decode_attention(
    *map(jnp.asarray, (q, k, v, table, lengths)), impl="pallas_gpu", interpret=True
  )
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, table, lengths), atol=1e-5)


def test_pallas_tpu_kernel_in_interpret_mode_matches_reference():
  # JAX's TPU paged-attention kernel loads every K/V page as bfloat16 (its `_maybe_dequantize`
  # casts unquantized pages too), so it equals the reference on bfloat16-rounded pages exactly;
  # against float32 pages it is within bfloat16 rounding.
  import ml_dtypes

  q, k, v, table, lengths = _random_cache(6)
  out = paged_cache.pallas_decode_attention(
    *map(jnp.asarray, (q, k, v, table, lengths)), impl="pallas_tpu", interpret=True
  )
  bf16 = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32)
  want = _reference(q, bf16(k), bf16(v), table, lengths)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, table, lengths), atol=3e-2)


def test_engine_with_the_gpu_kernel_samples_the_same_rows():
  cfg = lm.ModelConfig(
    vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
  )  # fmt: skip
  model = lm.CausalLM(cfg, rngs=nnx.Rngs(1))
  prompts = [[5, 9, 11], [7], [3, 4, 5, 6, 7, 8]]
  kw = dict(max_new_tokens=6, temperature=1.0, seed=1, max_new_tokens_per_row=[6, 2, 5])
  xla = sampler.generate(model, prompts, engine_options=continuous.EngineOptions(2, 4), **kw)
  kernel = continuous.EngineOptions(2, 4, attention="pallas_gpu", interpret=True)
  gpu = sampler.generate(model, prompts, engine_options=kernel, **kw)
  np.testing.assert_array_equal(gpu.tokens, xla.tokens)
  np.testing.assert_allclose(gpu.logprobs, xla.logprobs, atol=1e-5)
