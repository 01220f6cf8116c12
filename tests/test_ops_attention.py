"""ops/attention.py: every implementation against brute-force masked attention, values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omniopd_jax.ops import attention as attn


def reference(q, k, v, segment_ids, scale):
  """Dense softmax attention with the causal, same-segment mask, in numpy float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  k, v = np.repeat(k, h // k.shape[2], axis=2), np.repeat(v, h // v.shape[2], axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) * scale
  seg = np.asarray(segment_ids)
  mask = np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def _inputs(b, t, h, kv, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, d))
  k = jax.random.normal(ks[1], (b, t, kv, d))
  v = jax.random.normal(ks[2], (b, t, kv, d))
  return q, k, v, jax.random.normal(ks[3], (b, t, h, d))


def _padded_segments(b, t, seed=0):
  """Left-padded prompt + right-padded response: one contiguous span of 1s per row."""
  rng = np.random.RandomState(seed)
  seg = np.zeros((b, t), np.int32)
  for row in range(b):
    start = rng.randint(0, t // 3)
    seg[row, start : rng.randint(start + 2, t + 1)] = 1
  return seg


def _check(impl, q, k, v, d_out, seg, atol=2e-5, grads=True, wrap=lambda f: f, **kwargs):
  scale = q.shape[-1] ** -0.5
  real = (seg > 0)[:, :, None, None]
  d_out = d_out * real  # the losses never read padding outputs
  run = wrap(lambda q, k, v: attn.attention(q, k, v, jnp.asarray(seg), implementation=impl,
                                            scale=scale, **kwargs))  # fmt: skip
  out = run(q, k, v)
  want = reference(q, k, v, seg, scale)
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, want, 0), atol=atol)
  if not grads:
    return
  f = lambda q, k, v: jnp.sum(run(q, k, v) * d_out)
  g = lambda q, k, v: jnp.sum(_jax_reference(q, k, v, jnp.asarray(seg), scale) * d_out)
  for a, b in zip(jax.grad(f, (0, 1, 2))(q, k, v), jax.grad(g, (0, 1, 2))(q, k, v)):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=atol * 5)


def _jax_reference(q, k, v, seg, scale):
  b, t, h, d = q.shape
  kv = k.shape[2]
  s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, kv, h // kv, d), k) * scale
  mask = jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  p = jax.nn.softmax(jnp.where(mask[:, None, None], s, -1e30), -1)
  return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, h, d)


@pytest.mark.parametrize("block", [4, 8, 64])
def test_blockwise_equals_masked_attention_with_padding(block):
  q, k, v, d_out = _inputs(3, 19, 4, 2, 8)  # T=19: no block divides it
  _check("blockwise", q, k, v, d_out, _padded_segments(3, 19), block=block)


def test_blockwise_packed_segments_do_not_see_each_other():
  q, k, v, d_out = _inputs(2, 16, 2, 1, 8, seed=1)
  seg = np.array([[1] * 5 + [2] * 7 + [3] * 3 + [0], [0] * 2 + [1] * 9 + [2] * 5], np.int32)
  _check("blockwise", q, k, v, d_out, seg, block=4)


def test_blockwise_skips_blocks_above_the_diagonal():
  """The forward's inner loop runs i + 1 key blocks for query block i: n(n+1)/2, not n^2."""
  q, k, v, _ = _inputs(1, 32, 2, 2, 4)
  seg = jnp.ones((1, 32), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda q: attn.attention(q, k, v, seg, implementation="blockwise",
                                                  block=8))(q)  # fmt: skip
  text = str(jaxpr)
  assert "while" in text  # fori_loop with a trip count that depends on the query block
  # No [T, T] (32 x 32) score array anywhere: only [8, 8] blocks.
  assert "32,32]" not in text.replace(" ", "")


def test_xla_dot_product_attention_on_rotated_spans():
  """jax.nn.dot_product_attention (implementation='xla'; 'cudnn' runs the same code on a GPU)."""
  q, k, v, d_out = _inputs(3, 17, 4, 2, 8, seed=2)
  _check("xla", q, k, v, d_out, _padded_segments(3, 17, seed=2))


def test_splash_kernel_in_interpret_mode():
  q, k, v, d_out = _inputs(1, 40, 4, 2, 16, seed=3)
  seg = _padded_segments(1, 40, seed=3)
  _check("splash", q, k, v, d_out, seg, block=128, interpret=True)


def test_pallas_gpu_kernel_in_interpret_mode():
  # A power-of-two number of blocks: with 3 blocks the kernel's interpret-mode backward reads
  # past its buffers in JAX 0.10.2 (NaN in dq of the last block); the forward is fine.
  q, k, v, d_out = _inputs(1, 30, 4, 2, 8, seed=4)
  _check("pallas_gpu", q, k, v, d_out, _padded_segments(1, 30, seed=4), block=16, interpret=True)
  q, k, v, d_out = _inputs(1, 40, 4, 2, 8, seed=5)
  _check("pallas_gpu", q, k, v, d_out, _padded_segments(1, 40, seed=5), block=16,
         interpret=True, grads=False)  # fmt: skip


def test_auto_and_unknown_implementations():
  assert attn.resolve("auto") in ("blockwise", "cudnn")
  assert attn.resolve("dense") == "dense"
  with pytest.raises(ValueError, match="choose from"):
    attn.resolve("flash")


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_pallas_kernels_run_per_shard_under_a_mesh(impl):
  # GSPMD cannot partition a Pallas custom call: under a mesh the kernel runs in a shard_map
  # (rows over data x fsdp, kv heads over tensor) and gives the reference's values. Both kernels
  # go through ops.attention.per_shard; the slow interpret-mode splash is only lowered here.
  from jax.sharding import NamedSharding, PartitionSpec

  from omniopd_jax import sharding

  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  q, k, v, d_out = _inputs(4, 32, 4, 2, 8, seed=6)
  seg = _padded_segments(4, 32, seed=6)
  seg[3, 20:] = np.where(seg[3, 20:] > 0, 2, 0)  # a packed row: two segments
  rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  q, k, v, d_out, seg_j = (jax.device_put(x, rows) for x in (q, k, v, d_out, jnp.asarray(seg)))

  def under_mesh(fn):
    def wrapped(*args):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return fn(*args)

    return jax.jit(wrapped)

  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    hlo = jax.jit(lambda q, k, v: attn.attention(q, k, v, seg_j, implementation=impl, block=16,
                                                 interpret=True)).lower(q, k, v).as_text()  # fmt: skip
  assert "manual_computation" in hlo  # the kernel sits inside a shard_map
  if impl == "splash":
    return
  # Values only: the kernels' own gradients are checked above, and shard_map's transpose is JAX's.
  _check(impl, q, k, v, d_out, seg, block=16, interpret=True, grads=False, wrap=under_mesh)
  with pytest.raises(ValueError, match="do not divide"):
    under_mesh(lambda q: attn.attention(q, q[:, :, :2], q[:, :, :2], seg_j[:3],
                                        implementation=impl, interpret=True))(q[:3])  # fmt: skip
