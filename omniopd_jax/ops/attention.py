"""Causal self-attention for training and prefill without [T, T] score matrices.

Every implementation takes q [B, T, H, D], k and v [B, T, KV, D] (grouped-query: H a multiple of
KV) and segment ids [B, T] int32, and returns [B, T, H, D]. Query t attends key s iff s <= t and
both carry the same segment id. With `segment_ids = attention_mask` (1 real, 0 padding) a real
token sees exactly the real tokens before it, as the dense masked attention does; padding queries
see padding keys only (their outputs are never read). Packed rows number their sequences 1, 2, ...

Implementations (`IMPLEMENTATIONS`, chosen by `model.attention`):
  dense       the model's own einsum attention with a [B, T, S] mask (the reference; lm.py)
  blockwise   pure JAX, flash-attention style: online softmax over key blocks, blocks above the
              causal diagonal never computed, a custom VJP that recomputes scores block by block;
              memory O(T x block) per head. Works on every backend (the CPU path).
  xla | cudnn jax.nn.dot_product_attention; rows are first rotated so that their one contiguous
              span of real tokens starts at 0 (the left-padded prompt + right-padded response
              layout), which the causal mask plus key lengths then describe exactly.
  splash      the TPU Pallas splash-attention kernel JAX ships (per kv-head MQA, segment ids).
  pallas_gpu  the GPU Pallas (Triton) flash-attention kernel JAX ships (segment ids).
  auto        cudnn on GPU (bfloat16/float16 inputs), blockwise elsewhere.
The two Pallas kernels run on the CPU in interpret mode (`interpret=True`), which is how the
tests check them. GSPMD cannot partition a Pallas kernel, so under a mesh (`jax.set_mesh`, or
`jax.sharding.use_abstract_mesh` while tracing, as train.step does) they run in a shard_map: rows
over the mesh's batch axes, heads over "tensor" when the kv heads divide it.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from omniopd_jax import sharding

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "xla", "cudnn", "splash", "pallas_gpu")
# A large finite negative (not -inf): exp() of it is 0 and max() with it stays finite.
_NEG = -0.7 * float(np.finfo(np.float32).max)
BLOCK = 512  # blockwise: query and key tokens per block


def resolve(implementation: str) -> str:
  """'auto' -> the implementation for the default backend; others are checked and returned."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention={implementation!r}: choose from {IMPLEMENTATIONS}")
  if implementation == "auto":
    return "cudnn" if jax.default_backend() == "gpu" else "blockwise"
  return implementation


def attention(q, k, v, segment_ids, *, implementation="auto", scale=None, block=BLOCK, **kwargs):
  """Causal attention within segments: q [B, T, H, D], k, v [B, T, KV, D] -> [B, T, H, D]."""
  impl = resolve(implementation)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  segment_ids = segment_ids.astype(jnp.int32)
  if implementation == "auto" and impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    impl = "blockwise"  # cuDNN's flash attention takes half precision only
  if impl == "blockwise":
    return blockwise_attention(q, k, v, segment_ids, scale=scale, block=block)
  if impl in ("xla", "cudnn"):
    return span_attention(q, k, v, segment_ids, scale=scale, implementation=impl)
  if impl == "splash":
    kernel = functools.partial(splash_attention, scale=scale, **kwargs)
    return per_shard(kernel, q, k, v, segment_ids)
  if impl == "pallas_gpu":
    kernel = functools.partial(pallas_gpu_attention, scale=scale, **kwargs)
    return per_shard(kernel, q, k, v, segment_ids)
  raise ValueError("attention='dense' is the model's own path (models/lm.py), not an op here")


# ---------------------------------------------------------------- blockwise (pure JAX, any backend)


def blockwise_attention(q, k, v, segment_ids, *, scale, block=BLOCK):
  """Flash-style causal attention in pure JAX; see the module docstring."""
  b, t, h, d = q.shape
  blk = min(block, t)
  n = -(-t // blk)
  pad = n * blk - t
  # Padded positions get segment -1: they match no real token, and each still sees itself.
  seg = _pad(segment_ids, pad, fill=-1)  # [B, T']
  qb = _query_blocks(q, k.shape[2], n, blk, pad)  # [N, B, blk, KV, G, D]
  segb = _blocks(seg, n, blk, 0)  # [N, B, blk]
  out = _flash((scale, blk), qb, _pad(k, pad), _pad(v, pad), segb, seg, jnp.int32(0))
  return jnp.moveaxis(out, 0, 1).reshape(b, n * blk, h, d)[:, :t]


def blockwise_chunk_attention(q, k, v, q_segment_ids, segment_ids, q_offset, *, scale, block):
  """Blockwise attention of one query chunk over the whole sequence's keys.

  q [B, C, H, D] holds the queries at positions q_offset .. q_offset + C - 1 (q_segment_ids
  [B, C]); k, v [B, T, KV, D] and segment_ids [B, T] the whole sequence. k and v may be kept in
  float32 (their gradients then come back in float32): each key block is cast to q's dtype.
  C, T and q_offset (an int32 scalar, traced inside a scan over chunks) are multiples of
  `block`. Query blocks see the key blocks up to their own (causal by absolute position): the
  chunks of a sequence together compute exactly blockwise_attention. Gradients flow to k and v
  over every key up to the chunk's end (ops/token_chunks sums them over the chunks).
  """
  b, c, h, d = q.shape
  t, kv = k.shape[1], k.shape[2]
  if c % block or t % block:
    raise ValueError(f"query chunk {c} and sequence {t} must be multiples of the block {block}")
  nq = c // block
  qb = _query_blocks(q, kv, nq, block, 0)  # [Nq, B, blk, KV, G, D]
  seg_q = _blocks(q_segment_ids.astype(jnp.int32), nq, block, 0)  # [Nq, B, blk]
  q0 = (jnp.asarray(q_offset) // block).astype(jnp.int32)  # the chunk's first query block
  out = _flash((scale, block), qb, k, v, seg_q, segment_ids.astype(jnp.int32), q0)
  return jnp.moveaxis(out, 0, 1).reshape(b, c, h, d)


def _pad(x, pad, fill=0):
  """[B, T, ...] padded at the end of T with `pad` entries of `fill`."""
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


def _blocks(x, n, blk, pad, fill=0):
  """[B, T, ...] -> [N, B, blk, ...], padded at the end with `fill`."""
  x = _pad(x, pad, fill)
  return jnp.moveaxis(x.reshape(x.shape[0], n, blk, *x.shape[2:]), 1, 0)


def _key_block(x, j, blk, dtype=None):
  """Key block j of x [B, T, ...] -> [B, blk, ...], cast to `dtype` block by block. Keys stay in
  their [B, T, ...] layout and dtype: no blocked or cast copy of the whole sequence's keys and
  values (float32 ones, whose gradients then come back in float32, are cast per block)."""
  block = jax.lax.dynamic_slice_in_dim(x, j * blk, blk, axis=1)
  return block if dtype is None else block.astype(dtype)


def _query_blocks(q, kv, n, blk, pad):
  """q [B, T, H, D] -> [N, B, blk, KV, G, D] (the G query heads sharing a kv head together)."""
  b, t, h, d = q.shape
  return _blocks(q.reshape(b, t, kv, h // kv, d), n, blk, pad)


def _block_mask(blk, i, j, seg_q, seg_k):
  """[B, blk_q, blk_k] bool: causal by absolute position and same segment."""
  pos = jnp.arange(blk)
  causal = (j * blk + pos)[None, :] <= (i * blk + pos)[:, None]
  return causal[None] & (seg_q[:, :, None] == seg_k[:, None, :])


def _scores(meta, qi, kj, i, j, seg_q, seg_k):
  """Masked scores [B, KV, G, blk_q, blk_k] float32 and the mask broadcast to them; i and j are
  the absolute block indices of the queries and the keys."""
  scale, blk = meta
  s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
  mask = _block_mask(blk, i, j, seg_q, seg_k)[:, None, None]
  return jnp.where(mask, s, _NEG), mask


def _flash_forward(meta, qb, k, v, seg_qb, seg_k, q0):
  """Query blocks qb [Nq, B, blk, KV, G, D] at absolute block indices q0 .. q0 + Nq - 1 over keys
  k, v [B, T, KV, D] (segments seg_k [B, T]; T a multiple of blk)
  -> (out [Nq, B, blk, KV, G, D], lse [Nq, B, KV, G, blk])."""

  def q_block(i):
    qi, seg_q = qb[i], seg_qb[i]
    b, blk, kv, g, d = qi.shape
    at = q0 + i  # absolute block index of these queries

    def step(j, carry):
      m, total, acc = carry  # [B, KV, G, blk] x 2, [B, KV, G, blk, D]: running max, sum, output
      kj, vj = _key_block(k, j, blk, qb.dtype), _key_block(v, j, blk, qb.dtype)
      s, mask = _scores(meta, qi, kj, at, j, seg_q, _key_block(seg_k, j, blk))
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(qb.dtype), vj,
                      preferred_element_type=jnp.float32)  # fmt: skip
      return m_new, total * corr + p.sum(-1), acc * corr[..., None] + pv

    init = (
      jnp.full((b, kv, g, blk), _NEG, jnp.float32),
      jnp.zeros((b, kv, g, blk), jnp.float32),
      jnp.zeros((b, kv, g, blk, d), jnp.float32),
    )
    # Key blocks 0..at only: the blocks above the causal diagonal are never computed.
    m, total, acc = jax.lax.fori_loop(0, at + 1, step, init)
    out = jnp.moveaxis(acc / total[..., None], 3, 1).astype(qb.dtype)  # [B, blk, KV, G, D]
    return out, m + jnp.log(total)  # lse [B, KV, G, blk]

  return jax.lax.map(q_block, jnp.arange(qb.shape[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(meta, qb, k, v, seg_qb, seg_k, q0):
  return _flash_forward(meta, qb, k, v, seg_qb, seg_k, q0)[0]


def _flash_fwd(meta, qb, k, v, seg_qb, seg_k, q0):
  out, lse = _flash_forward(meta, qb, k, v, seg_qb, seg_k, q0)
  return out, (qb, k, v, seg_qb, seg_k, q0, out, lse)


def _flash_bwd(meta, res, d_out):
  qb, k, v, seg_qb, seg_k, q0, out, lse = res
  scale, blk = meta
  nq, nk = qb.shape[0], k.shape[1] // blk
  key = lambda x, j: _key_block(x, j, blk, qb.dtype)
  # delta_q = sum_d dO * O: the softmax backward's row term, [Nq, B, KV, G, blk].
  delta = jnp.moveaxis(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1), 2, -1)

  def grads(i, j):
    """Recomputed probabilities and d scores of block (i, j), both [B, KV, G, blk, blk] f32."""
    s, mask = _scores(meta, qb[i], key(k, j), q0 + i, j, seg_qb[i], _key_block(seg_k, j, blk))
    p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", d_out[i], key(v, j), preferred_element_type=jnp.float32)
    return p, p * (dp - delta[i][..., None])

  def dq_block(i):
    def step(j, dq):
      _, ds = grads(i, j)
      return dq + jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(qb.dtype), key(k, j),
                             preferred_element_type=jnp.float32)  # fmt: skip

    zero = jnp.zeros(qb.shape[1:], jnp.float32)
    return jax.lax.fori_loop(0, q0 + i + 1, step, zero) * scale

  def dkv_block(j):
    def step(i, carry):
      dk, dv = carry
      p, ds = grads(i, j)
      dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(d_out.dtype), d_out[i],
                           preferred_element_type=jnp.float32)  # fmt: skip
      dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(qb.dtype), qb[i],
                           preferred_element_type=jnp.float32)  # fmt: skip
      return dk, dv

    b, _, kv, d = k.shape
    zero = jnp.zeros((b, blk, kv, d), jnp.float32)
    # Query blocks at or below the diagonal (none when key block j lies past the chunk).
    first = jnp.clip(j - q0, 0, nq)
    dk, dv = jax.lax.fori_loop(first, nq, step, (zero, zero))
    return dk * scale, dv

  dq = jax.lax.map(dq_block, jnp.arange(nq)).astype(qb.dtype)

  def dkv_into(j, carry):  # key block j's gradients written in place into [B, T, KV, D]
    at = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(acc, x, j * blk, axis=1)
    dk_j, dv_j = dkv_block(j)
    return at(carry[0], dk_j), at(carry[1], dv_j)

  zero = jnp.zeros(k.shape, jnp.float32)
  # Key blocks past the last query block get no gradient (a chunk's later keys): left at 0.
  dk, dv = jax.lax.fori_loop(0, jnp.minimum(q0 + nq, nk), dkv_into, (zero, zero))
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------ jax.nn.dot_product_attention (cuDNN)


def span_attention(q, k, v, segment_ids, *, scale, implementation="cudnn"):
  """jax.nn.dot_product_attention for rows whose real tokens form one contiguous span.

  The update's rows (left-padded prompt, then the response, right-padded) and the sampler's
  prefill rows have that layout. Each row is rotated so that its span starts at position 0; a
  causal mask with key lengths then equals the segment mask on the span, and the rotation is
  undone on the output. Rows with several segments (packed) need blockwise or a Pallas kernel.
  """
  b, t = segment_ids.shape
  real = segment_ids > 0
  start = jnp.argmax(real, axis=1)  # [B] first real token (0 for an all-padding row)
  length = jnp.maximum(real.sum(axis=1), 1).astype(jnp.int32)  # [B]; >= 1 keeps rows NaN-free
  idx = (jnp.arange(t)[None, :] + start[:, None]) % t  # [B, T]: rotated slot -> original slot
  rotate = lambda x: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
  out = jax.nn.dot_product_attention(
    rotate(q), rotate(k), rotate(v), scale=scale, is_causal=True,
    query_seq_lengths=length, key_value_seq_lengths=length, implementation=implementation,
  )  # fmt: skip
  back = (jnp.arange(t)[None, :] - start[:, None]) % t  # original slot -> rotated slot
  return jnp.take_along_axis(out, back[:, :, None, None], axis=1)


# ------------------------------------------------------------------- Pallas kernels JAX ships


def per_shard(kernel, q, k, v, segment_ids):
  """`kernel(q, k, v, segment_ids)` on each device's rows (and heads) under the current mesh.

  A Pallas kernel is one custom call that GSPMD cannot split, so a sharded batch must reach it
  through a shard_map: rows over the batch axes (sharding.DEFAULT_RULES["batch"]), kv heads over
  "tensor" when they divide it (each shard then holds whole query groups). Without a mesh, or on
  one device, the kernel sees the whole batch.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q, k, v, segment_ids)
  batch_target = dict(sharding.DEFAULT_RULES)["batch"]
  batch_axes = (batch_target,) if isinstance(batch_target, str) else tuple(batch_target)
  batch_axes = tuple(a for a in batch_axes if mesh.shape.get(a, 1) > 1)
  rows = math.prod(mesh.shape[a] for a in batch_axes)
  if q.shape[0] % rows:
    raise ValueError(
      f"attention kernel under mesh {dict(mesh.shape)}: {q.shape[0]} rows do not divide over the "
      f"batch axes {batch_axes} ({rows} shards); make the batch a multiple of {rows}"
    )
  tensor = mesh.shape.get("tensor", 1)
  heads = "tensor" if tensor > 1 and k.shape[2] % tensor == 0 else None
  spec = P(batch_axes or None, None, heads, None)
  return jax.shard_map(
    kernel, mesh=mesh, in_specs=(spec, spec, spec, P(batch_axes or None, None)), out_specs=spec,
    check_vma=False,
  )(q, k, v, segment_ids)  # fmt: skip


def splash_attention(q, k, v, segment_ids, *, scale, interpret=False, block=512):
  """TPU splash attention: one MQA kernel per kv head (its G query heads share k, v)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, t, h, d = q.shape
  kv = k.shape[2]
  g = h // kv
  blk = block  # the kernel's blocks are multiples of 128
  pad = -(-t // blk) * blk - t
  if pad:  # the kernel tiles T exactly; padded slots take a segment id of their own
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
  tp = t + pad
  mask = splash.MultiHeadMask([splash.CausalMask((tp, tp)) for _ in range(g)])
  sizes = splash.BlockSizes(
    block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
    block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk,
  )  # fmt: skip
  kernel = splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
  qh = (q * scale).reshape(b, tp, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]

  def one(qg, kk, vv, seg):  # [G, T, D], [T, D], [T, D], [T]
    return kernel(qg, kk, vv, segment_ids=splash.SegmentIds(q=seg, kv=seg))

  per_head = jax.vmap(one, in_axes=(0, 0, 0, None))  # over kv heads
  out = jax.vmap(per_head)(qh, kh, vh, segment_ids)  # [B, KV, G, T, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t]


def pallas_gpu_attention(q, k, v, segment_ids, *, scale, interpret=False, block=128):
  """The GPU Pallas flash-attention kernel (k, v repeated to H heads; T padded to the block)."""
  from jax.experimental.pallas.ops.gpu import attention as gpu

  b, t, h, d = q.shape
  g = h // k.shape[2]
  blk = min(block, t)
  pad = -(-t // blk) * blk - t
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
  small = min(32, blk)
  sizes = gpu.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=small, block_kv_dkv=small,
                         block_q_dq=small, block_kv_dq=small)  # fmt: skip
  out = gpu.mha(q * scale, k, v, segment_ids, sm_scale=1.0, causal=True, block_sizes=sizes,
                interpret=interpret)  # fmt: skip
  return out[:, :t]
