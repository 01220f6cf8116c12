"""Per-token work over sequence chunks, so its [T, intermediate] activations are never all live.

A transformer's MLP (and its norm) acts on each token alone: running it over `chunk`-token slices
of the sequence inside a `lax.scan`, each slice under `jax.checkpoint`, keeps only the slice's
input for the backward pass and recomputes its [chunk, intermediate] activations there. Training
memory for the MLP drops from O(T x intermediate) to O(chunk x intermediate) per layer, for one
more forward of the MLP's matmuls. Values are the unchunked ones: each token sees the same math.

Weights read inside `fn` (closed over, in their stored dtype) get their gradients summed over the
chunks in that dtype: float32 master weights cast to bfloat16 inside `fn` accumulate in float32.
"""

import jax
import jax.numpy as jnp


def chunk_layout(length: int, chunk: int) -> tuple[int, int]:
  """(number of chunks, tokens per chunk) covering `length` tokens with the least padding."""
  if chunk <= 0 or length <= chunk:
    return 1, length
  count = -(-length // chunk)
  return count, -(-length // count)


def map_token_chunks(fn, x: jax.Array, chunk: int) -> jax.Array:
  """fn over sequence chunks of x [B, T, E] -> [B, T, E'], rematerialised chunk by chunk.

  `fn` maps [B, c, E] -> [B, c, E'] token by token (no mixing along the sequence). `chunk` <= 0
  or >= T: one call of fn, unchanged. The last chunk is zero-padded; padded rows are dropped.
  """
  b, t = x.shape[:2]
  count, size = chunk_layout(t, chunk)
  if count == 1:
    return fn(x)
  pad = count * size - t
  xs = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  xs = jnp.moveaxis(xs.reshape(b, count, size, *x.shape[2:]), 1, 0)  # [n, B, c, E]
  body = jax.checkpoint(fn)
  _, ys = jax.lax.scan(lambda carry, xc: (carry, body(xc)), None, xs)  # [n, B, c, E']
  ys = jnp.moveaxis(ys, 0, 1).reshape(b, count * size, *ys.shape[3:])
  return ys[:, :t]
