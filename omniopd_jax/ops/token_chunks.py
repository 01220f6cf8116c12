"""Per-token work over sequence chunks, so its [T, intermediate] activations are never all live.

A transformer's MLP (and its norm) acts on each token alone: running it over `chunk`-token slices
of the sequence inside a `lax.scan`, each slice under `jax.checkpoint`, keeps only the slice's
input for the backward pass and recomputes its [chunk, intermediate] activations there. Training
memory for the MLP drops from O(T x intermediate) to O(chunk x intermediate) per layer, for one
more forward of the MLP's matmuls. Values are the unchunked ones: each token sees the same math.
decoder_layer_chunks (config model.layer_chunk) runs a whole decoder layer the same way: keys
and values first, then each query chunk's attention over all of them, o-projection, norm and MLP.

Weights read inside `fn` (closed over, in their stored dtype) get their gradients summed over the
chunks in that dtype: float32 master weights cast to bfloat16 inside `fn` accumulate in float32.
"""

import math

import jax
import jax.numpy as jnp

from omniopd_jax.ops import attention as attention_ops

ALIGN = 128  # chunks longer than this are rounded up to a multiple of it (aligned_chunk_layout)


def chunk_layout(length: int, chunk: int) -> tuple[int, int]:
  """(number of chunks, tokens per chunk) covering `length` tokens with the least padding."""
  if chunk <= 0 or length <= chunk:
    return 1, length
  count = -(-length // chunk)
  return count, -(-length // count)


def aligned_chunk_layout(length: int, chunk: int, block: int) -> tuple[int, int, int]:
  """(chunks, tokens per chunk, attention block) for query chunks of about `chunk` tokens.

  Chunk offsets must fall on attention block boundaries: a chunk longer than ALIGN tokens is
  rounded up to a multiple of ALIGN, and the block is the largest divisor of the chunk length
  that divides `block` too (8447 tokens in chunks of 1024: 9 chunks of 1024, blocks of 512).
  """
  count, size = chunk_layout(length, chunk)
  if size > ALIGN:
    size = -(-size // ALIGN) * ALIGN
  return count, size, math.gcd(size, block)


def pad_tokens(x: jax.Array, length: int, fill=0) -> jax.Array:
  """x [B, T, ...] padded with `fill` along T to `length` tokens."""
  pad = length - x.shape[1]
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


def scan_chunks(fn, inputs, count: int, size: int):
  """fn over `count` chunks of `size` tokens, rematerialised chunk by chunk -> [B, count*size, E'].

  `inputs` is a tuple of [B, count * size, ...] arrays; `fn((chunk of each input...,
  offset))` gets [B, size, ...] slices and the chunk's first token index (int32) and returns
  [B, size, E'] (or a tuple of such arrays: the result is then a tuple too). Only the chunks'
  inputs are kept for the backward pass. Each chunk slices the inputs in place (no stacked
  [count, B, size, ...] copy of them); their gradients are summed into one [B, T, ...] buffer,
  slice by slice.
  """
  b = inputs[0].shape[0]
  offsets = jnp.arange(count, dtype=jnp.int32) * size

  def one(offset):
    chunk = [jax.lax.dynamic_slice_in_dim(a, offset, size, axis=1) for a in inputs]
    return fn((*chunk, offset))

  body = jax.checkpoint(one)

  def step(out, offset):
    # Each chunk's output written in place into the [B, T', E'] result carried by the scan
    # (outside the checkpoint: a write saves nothing for the backward pass), so the result's
    # gradient is read chunk by chunk from one buffer, never restacked as [count, B, size, E'].
    put = lambda o, y: jax.lax.dynamic_update_slice_in_dim(o, y, offset, axis=1)
    return jax.tree.map(put, out, body(offset)), None

  shapes = jax.eval_shape(one, offsets[0])
  zeros = jax.tree.map(lambda y: jnp.zeros((b, count * size, *y.shape[2:]), y.dtype), shapes)
  out, _ = jax.lax.scan(step, zeros, offsets)
  return out  # [B, T', E'] (each output of fn)


def map_token_chunks(fn, x: jax.Array, chunk: int) -> jax.Array:
  """fn over sequence chunks of x [B, T, E] -> [B, T, E'], rematerialised chunk by chunk.

  `fn` maps [B, c, E] -> [B, c, E'] token by token (no mixing along the sequence). `chunk` <= 0
  or >= T: one call of fn, unchanged. The last chunk is zero-padded; padded rows are dropped.
  """
  t = x.shape[1]
  count, size = chunk_layout(t, chunk)
  if count == 1:
    return fn(x)
  ys = scan_chunks(lambda xs: fn(xs[0]), (pad_tokens(x, count * size),), count, size)
  return ys[:, :t]


def decoder_layer_chunks(layer, x, positions, inv_freq, segment_ids, chunk: int) -> jax.Array:
  """A decoder layer (models/lm.py DecoderLayer) over query chunks -> [B, T, E] (training).

  Keys and values [B, T, KV, D] first, for the whole sequence (projected chunk by chunk: the
  normed input is never whole) and kept in float32, so their gradients are summed over the
  chunks in float32; then, per chunk in a rematerialised scan, its queries' blockwise attention
  over them (causal by absolute position, within segments; each key block cast to the compute
  dtype), the o-projection, the residual, the norm and the MLP. Never a [T, E]-sized intermediate
  of the norms, attention or MLP; the same values as the whole layer. T is padded to whole chunks
  (padding: segment -1, dropped at the end).
  """
  attn, norm = layer.self_attn, layer.input_layernorm
  t = x.shape[1]
  count, size, blk = aligned_chunk_layout(t, chunk, attention_ops.BLOCK)
  pad = lambda a, fill=0: pad_tokens(a, count * size, fill)
  x, positions, segments = pad(x), pad(positions), pad(segment_ids, -1)
  kv = lambda xs: attn.keys_values(norm(xs[0]), xs[1], inv_freq)  # [B, c, KV, D] each
  k, v = (a.astype(jnp.float32) for a in scan_chunks(kv, (x, positions), count, size))

  def one_chunk(xs):
    x_c, pos_c, seg_c, offset = xs  # [B, c, E], [B, c], [B, c], []
    q = attn.queries(norm(x_c), pos_c, inv_freq)  # [B, c, H, D]
    out = attention_ops.blockwise_chunk_attention(
      q, k, v, seg_c, segments, offset, scale=attn.scale, block=blk
    )
    x_c = x_c + attn._out(out)
    return x_c + layer.mlp(layer.post_attention_layernorm(x_c))

  return scan_chunks(one_chunk, (x, positions, segments), count, size)[:, :t]
