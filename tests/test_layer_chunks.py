"""model.layer_chunk: a layer after its keys and values over rematerialised query chunks.

Brute-force references: the chunked attention op against dense masked attention (values and
gradients), and the chunked model against the unchunked one (values and gradients within 1e-5
relative in float32; Llama and Qwen3, tied and untied, scanned and unrolled, padded and packed).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omniopd_jax.models import lm as model_lib
from omniopd_jax.ops import attention as attn
from omniopd_jax.ops import token_chunks

TINY = dict(
  vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
  num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


def _dense_attention(q, k, v, seg, scale):
  b, t, h, d = q.shape
  k, v = jnp.repeat(k, h // k.shape[2], axis=2), jnp.repeat(v, h // v.shape[2], axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, k) * scale
  mask = jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  p = jax.nn.softmax(jnp.where(mask[:, None], s, -1e30), -1)
  return jnp.einsum("bhts,bshd->bthd", p, v)


def test_query_chunks_together_equal_dense_attention_and_its_gradients():
  # 24 tokens in 3 chunks of 8 (blocks of 4), two packed sequences and padding in row 1.
  b, t, h, kv, d, c = 2, 24, 4, 2, 8, 8
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, d_out = (jax.random.normal(kk, (b, t, n, d)) for kk, n in zip(ks, (h, kv, kv, h)))
  seg = jnp.asarray([[1] * 10 + [2] * 14, [0] * 3 + [1] * 17 + [0] * 4], jnp.int32)
  scale = d**-0.5
  d_out = d_out * (seg > 0)[:, :, None, None]

  def chunked(q, k, v):
    parts = [
      attn.blockwise_chunk_attention(
        q[:, i : i + c], k, v, seg[:, i : i + c], seg, jnp.int32(i), scale=scale, block=4
      )
      for i in range(0, t, c)
    ]
    return jnp.concatenate(parts, axis=1)

  real = (seg > 0)[:, :, None, None]
  want = _dense_attention(q, k, v, seg, scale)
  np.testing.assert_allclose(chunked(q, k, v) * real, want * real, atol=2e-6)
  f = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * d_out)
  got = jax.jit(jax.grad(f(chunked), (0, 1, 2)))(q, k, v)
  ref = jax.grad(f(lambda q, k, v: _dense_attention(q, k, v, seg, scale)), (0, 1, 2))(q, k, v)
  for a, r in zip(got, ref, strict=True):
    np.testing.assert_allclose(a, r, atol=1e-5)
  with pytest.raises(ValueError, match="multiples of the block"):
    attn.blockwise_chunk_attention(q[:, :6], k, v, seg[:, :6], seg, 0, scale=scale, block=4)


def test_aligned_layout_puts_chunks_on_block_boundaries():
  assert token_chunks.aligned_chunk_layout(8447, 1024, 512) == (9, 1024, 512)
  assert token_chunks.aligned_chunk_layout(8447, 2048, 512) == (5, 1792, 256)
  assert token_chunks.aligned_chunk_layout(11, 4, 512) == (3, 4, 4)
  assert token_chunks.aligned_chunk_layout(11, 0, 512) == (1, 11, 1)


CASES = [
  ("llama", {}, False),
  ("llama", {"tie_word_embeddings": True}, True),
  ("qwen3", {"qk_norm": True, "head_dim": 16}, True),
  ("qwen3", {"qk_norm": True, "head_dim": 16, "tie_word_embeddings": True}, False),
]


@pytest.mark.parametrize("architecture,extra,scan", CASES)
def test_chunked_layers_equal_whole_layers_values_and_gradients(architecture, extra, scan):
  cfg = model_lib.ModelConfig(architecture=architecture, **TINY, **extra, scan_layers=scan)
  graphdef, params = nnx.split(model_lib.CausalLM(cfg, rngs=nnx.Rngs(3)), nnx.Param)
  rng = np.random.RandomState(1)
  ids = jnp.asarray(rng.randint(0, 64, size=(2, 11)))
  mask = jnp.asarray(np.arange(11)[None] >= np.array([[0], [3]]))  # row 1 left-padded

  def loss(params, chunk, remat):
    hidden = nnx.merge(graphdef, params).hidden_states(
      ids, mask, remat=remat, attention="blockwise", layer_chunk=chunk
    )
    return jnp.sum(jnp.where(mask[..., None], jnp.sin(hidden), 0.0)), hidden

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
  ref = grad(params, 0, False)
  for remat in (False, "full"):  # 11 tokens in chunks of 4: three chunks, the last one padded
    _assert_same(grad(params, 4, remat), ref, mask)


def test_chunked_layers_keep_packed_sequences_apart():
  # Two sequences packed in one row (segment ids 1, 2, then padding 0): the chunked layers give
  # each sequence its own hidden states, as the whole layers do.
  cfg = model_lib.ModelConfig(architecture="qwen3", **TINY, qk_norm=True, head_dim=16)
  graphdef, params = nnx.split(model_lib.CausalLM(cfg, rngs=nnx.Rngs(3)), nnx.Param)
  rng = np.random.RandomState(2)
  ids = jnp.asarray(rng.randint(0, 64, size=(1, 14)))
  seg = jnp.asarray([[1] * 7 + [2] * 5 + [0] * 2], jnp.int32)
  pos = jnp.asarray([list(range(7)) + list(range(5)) + [0, 0]])
  real = seg > 0

  def loss(params, chunk):
    hidden = nnx.merge(graphdef, params).hidden_states(
      ids, real, pos, remat="full", attention="blockwise", segment_ids=seg, layer_chunk=chunk
    )
    return jnp.sum(jnp.where(real[..., None], jnp.sin(hidden), 0.0)), hidden

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  ref, got = grad(params, 0), grad(params, 4)
  _assert_same(got, ref, real)
  alone = nnx.merge(graphdef, params).hidden_states(ids[:, 7:12])  # the second sequence alone
  np.testing.assert_allclose(got[0][1][:, 7:12], alone, rtol=1e-5, atol=1e-5)


def test_other_attentions_run_the_layer_whole():
  # layer_chunk applies to blockwise attention only: "dense" builds [T, T] scores in one piece, so
  # the chunk setting must leave it exactly as it was (the fused kernels likewise).
  cfg = model_lib.ModelConfig(architecture="llama", **TINY)
  model = model_lib.CausalLM(cfg, rngs=nnx.Rngs(3))
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(1, 9)))
  whole = model.hidden_states(ids, attention="dense")
  np.testing.assert_array_equal(model.hidden_states(ids, attention="dense", layer_chunk=4), whole)
  assert model_lib._chunkable(model_lib.SegmentMask(jnp.ones((1, 9), jnp.int32), "blockwise"))
  for impl in ("dense", "xla", "splash", "pallas_gpu"):
    assert not model_lib._chunkable(model_lib.SegmentMask(jnp.ones((1, 9), jnp.int32), impl))


def _assert_same(got, ref, mask):
  (out, hidden), grads = got
  (ref_out, ref_hidden), ref_grads = ref
  real = np.asarray(mask)[..., None]
  np.testing.assert_allclose(
    np.where(real, hidden, 0), np.where(real, ref_hidden, 0), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(float(out), float(ref_out), rtol=1e-5, atol=1e-5)  # a sum of ~200
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    r = np.asarray(r)  # float32 sums in another order: 1e-5 of the tensor's scale
    np.testing.assert_allclose(np.asarray(g), r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_planner_counts_one_chunked_layer():
  # tools.plan: with layer_chunk (blockwise attention, remat full) one layer's live set is the
  # whole sequence's input, gradients, keys and values plus one chunk's activations, not every
  # token's activations; without it (or with dense attention) nothing changes.
  from omniopd_jax.configs import math as math_config
  from omniopd_jax.tools import plan

  config = math_config.get_config("default")
  config.model.attention = "blockwise"
  cfg = plan.model_config(config, preset="qwen3-1.7b")
  mesh = dict(data=1, fsdp=8, tensor=1)
  acts = lambda **model: plan.plan(_with(config, **model), cfg, mesh)["activations"]
  assert acts(layer_chunk=256) < acts(layer_chunk=512) < acts(layer_chunk=0)
  assert acts(layer_chunk=256, attention="dense") == acts(layer_chunk=0, attention="dense")


def _with(config, **model):
  config = config.copy_and_resolve_references()
  config.model.update(**model)
  return config
