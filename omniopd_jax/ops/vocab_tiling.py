"""The LM head and every per-token quantity the losses need, without ever holding [B, L, V] logits.

At the paper's scale one row of 8192 tokens over a 151,936-token vocabulary is 4.6 GiB of float32
logits, and the exact KL needs the frozen base's as well. `head_stats` goes from final hidden
states [B, L, E] and the head weights straight to per-token statistics [B, L]:

  logprob     log p(y_t) of the target token              (OmniOPD, GRPO, sampled OPD, SFT)
  entropy     H(p) over the full vocabulary               (metrics, fork selection)
  kl_base     KL(p_base || p), the base head recomputed   (the KL anchor)
  kl_teacher  KL(p || p_teacher), a same-tokenizer teacher (white-box OPD, full vocabulary)

It walks the sequence in tiles of `tile_tokens` positions per row (`lax.scan`): each tile's logits
[B, T, V] are computed, reduced to statistics and dropped. A `jax.custom_vjp` makes the backward
pass walk the same tiles: it recomputes the tile's logits from the hidden states and the saved
log-normalisers, forms d loss / d logits for that tile in closed form and contracts it at once into
the hidden-state and head gradients, so the backward never holds [B, L, V] either (the idea of
MaxText's vocabulary tiling and Tunix's chunked log-probs; the code is ours). Only the student is
differentiated: base and teacher inputs get zero cotangents.

Closed forms, with p = softmax(z), z the student's logits of one token, g_* the cotangents:
  d logprob / dz = onehot(y) - p
  d entropy / dz = -p (log p + H)
  d kl_base / dz = p - p_base
  d kl_teacher / dz = p (log p - log p_teacher - KL(p || p_teacher))
All softmax arithmetic is float32; the head matmuls run in `compute_dtype` with float32 results.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

HEAD_LAYOUTS = ("ev", "ve")  # "ev": an lm_head kernel [E, V]; "ve": tied embeddings [V, E]
TILE_BYTES = 128 * 1024**2  # default tile: one row's float32 logits tile stays under this


class HeadStats(NamedTuple):
  """Per-token statistics, each [B, L] float32 (None where not asked for)."""

  logprob: jax.Array
  entropy: jax.Array
  kl_base: jax.Array | None = None
  kl_teacher: jax.Array | None = None


class Head(NamedTuple):
  """One model's final hidden states and head weights: what recomputes its logits tile by tile."""

  hidden: jax.Array  # [B, L, E]
  weights: jax.Array  # [E, V] (layout "ev") or [V, E] (layout "ve")
  layout: str = "ev"


def default_tile_tokens(vocab_size: int, length: int) -> int:
  """Positions per tile: a power of two whose [T, V] float32 tile fits TILE_BYTES, at most L."""
  t = max(TILE_BYTES // (4 * vocab_size), 8)
  return max(1, min(2 ** int(math.log2(t)), length))


def head_logits(hidden, weights, layout: str, compute_dtype) -> jax.Array:
  """[..., E] x head -> float32 logits [..., V] (the matmul in compute_dtype, float32 result)."""
  h = hidden.astype(compute_dtype)
  w = weights.astype(compute_dtype)
  contract = 0 if layout == "ev" else 1
  dims = (((h.ndim - 1,), (contract,)), ((), ()))
  return jax.lax.dot_general(h, w, dims, preferred_element_type=jnp.float32)


def head_stats(
  student: Head,
  targets: jax.Array,
  *,
  base: Head | None = None,
  teacher: Head | None = None,
  tile_tokens: int | None = None,
  compute_dtype=None,
) -> HeadStats:
  """Per-token log-prob, entropy and the requested KLs, tiled over the sequence.

  Args:
    student: the trained model's Head; hidden [B, L, E] predicts targets [B, L] (int).
    base: the frozen base's Head (same vocabulary) for kl_base, or None.
    teacher: a same-tokenizer teacher's Head for kl_teacher, or None.
    tile_tokens: positions per tile (default: default_tile_tokens); any L works (padded inside).
    compute_dtype: dtype of the head matmuls (default: the student's hidden dtype).

  Returns:
    HeadStats of [B, L] float32 arrays; differentiable in student.hidden and student.weights.
  """
  _check(student, targets, base, teacher)
  vocab = _vocab(student)
  length = targets.shape[1]
  tile = tile_tokens or default_tile_tokens(vocab, length)
  dtype = jnp.dtype(compute_dtype or student.hidden.dtype)
  # Frozen models enter as (hidden, weights) pairs without gradient; layouts are static metadata.
  frozen = tuple(
    None if h is None else jax.lax.stop_gradient((h.hidden, h.weights)) for h in (base, teacher)
  )
  layouts = (student.layout,) + tuple(None if h is None else h.layout for h in (base, teacher))
  logprob, entropy, kl_base, kl_teacher = _tiled(
    (tile, dtype, layouts), student.hidden, student.weights, targets, *frozen
  )
  return HeadStats(
    logprob[:, :length],
    entropy[:, :length],
    None if base is None else kl_base[:, :length],
    None if teacher is None else kl_teacher[:, :length],
  )


def _vocab(head: Head) -> int:
  return head.weights.shape[1 if head.layout == "ev" else 0]


def _check(student, targets, base, teacher):
  for name, head in (("student", student), ("base", base), ("teacher", teacher)):
    if head is None:
      continue
    if head.layout not in HEAD_LAYOUTS:
      raise ValueError(f"{name} head layout {head.layout!r}: choose from {HEAD_LAYOUTS}")
    if head.hidden.ndim != 3 or head.weights.ndim != 2:
      raise ValueError(f"{name}: hidden must be [B, L, E] and weights 2-D")
    e = head.weights.shape[0 if head.layout == "ev" else 1]
    if head.hidden.shape[-1] != e:
      raise ValueError(f"{name}: hidden size {head.hidden.shape[-1]} != head's {e}")
    if head.hidden.shape[:2] != targets.shape:
      raise ValueError(f"{name}: hidden {head.hidden.shape[:2]} != targets {targets.shape}")
    if _vocab(head) != _vocab(student):
      raise ValueError(
        f"{name} vocabulary {_vocab(head)} != student vocabulary {_vocab(student)}: the exact "
        "full-vocabulary KL needs the same tokenizer"
      )


def _to_tiles(x, tile):
  """[B, L, ...] -> [L / T, B, T, ...] (zero-padded to a multiple of T); batch stays axis 1."""
  b, length = x.shape[:2]
  n = -(-length // tile)
  pad = [(0, 0), (0, n * tile - length)] + [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, pad).reshape(b, n, tile, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _from_tiles(x, length):
  """[N, B, T, ...] -> [B, L, ...] (the padding cut)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _log_softmax_parts(z):
  """float32 logits [..., V] -> (log p, log-normaliser [...])."""
  lse = jax.nn.logsumexp(z, axis=-1)
  return z - lse[..., None], lse


def _tile_forward(meta, h, w, y, base, teacher):
  """One tile's statistics and log-normalisers: every output [B, T] float32."""
  _, dtype, (layout, base_layout, teacher_layout) = meta
  z = head_logits(h, w, layout, dtype)  # [B, T, V]
  logp, lse = _log_softmax_parts(z)
  p = jnp.exp(logp)
  logprob = jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(p * logp, axis=-1)
  zeros = jnp.zeros_like(lse)
  kl_base = lse_base = kl_teacher = lse_teacher = zeros
  if base is not None:
    logp_b, lse_base = _log_softmax_parts(head_logits(base[0], base[1], base_layout, dtype))
    kl_base = jnp.sum(jnp.exp(logp_b) * (logp_b - logp), axis=-1)
  if teacher is not None:
    logp_t, lse_teacher = _log_softmax_parts(
      head_logits(teacher[0], teacher[1], teacher_layout, dtype)
    )
    kl_teacher = jnp.sum(p * (logp - logp_t), axis=-1)
  return (logprob, entropy, kl_base, kl_teacher), (lse, lse_base, lse_teacher)


def _scan_forward(meta, hidden, weights, targets, base, teacher):
  tile = meta[0]
  xs = (
    _to_tiles(hidden, tile),
    _to_tiles(targets.astype(jnp.int32), tile),
    None if base is None else _to_tiles(base[0], tile),
    None if teacher is None else _to_tiles(teacher[0], tile),
  )

  def body(_, x):
    h, y, hb, ht = x
    b = None if base is None else (hb, base[1])
    t = None if teacher is None else (ht, teacher[1])
    return None, _tile_forward(meta, h, weights, y, b, t)

  _, (stats, norms) = jax.lax.scan(body, None, xs)
  return stats, norms  # tuples of [N, B, T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(meta, hidden, weights, targets, base, teacher):
  stats, _ = _scan_forward(meta, hidden, weights, targets, base, teacher)
  return tuple(_from_tiles(s, _padded(hidden, meta[0])) for s in stats)


def _padded(hidden, tile):
  return -(-hidden.shape[1] // tile) * tile


def _tiled_fwd(meta, hidden, weights, targets, base, teacher):
  stats, norms = _scan_forward(meta, hidden, weights, targets, base, teacher)
  out = tuple(_from_tiles(s, _padded(hidden, meta[0])) for s in stats)
  # Saved for the backward: the inputs plus [N, B, T] normalisers and statistics, never logits.
  entropy_tiles, kl_teacher_tiles = stats[1], stats[3]
  return out, (hidden, weights, targets, base, teacher, norms, entropy_tiles, kl_teacher_tiles)


def _tile_logits_grad(meta, h, w, y, base, teacher, norms, stats, cots):
  """d loss / d z of one tile [B, T, V] float32, from recomputed logits and saved normalisers."""
  _, dtype, (layout, base_layout, teacher_layout) = meta
  lse, lse_base, lse_teacher = norms
  entropy, kl_teacher = stats
  g_logprob, g_entropy, g_kl_base, g_kl_teacher = (c[..., None] for c in cots)  # [B, T, 1]
  logp = head_logits(h, w, layout, dtype) - lse[..., None]  # [B, T, V]
  p = jnp.exp(logp)
  onehot = jax.nn.one_hot(y, logp.shape[-1], dtype=jnp.float32)
  dz = g_logprob * (onehot - p) - g_entropy * p * (logp + entropy[..., None])
  if base is not None:
    logits_b = head_logits(base[0], base[1], base_layout, dtype)
    dz = dz + g_kl_base * (p - jnp.exp(logits_b - lse_base[..., None]))
  if teacher is not None:
    logp_t = head_logits(teacher[0], teacher[1], teacher_layout, dtype) - lse_teacher[..., None]
    dz = dz + g_kl_teacher * p * (logp - logp_t - kl_teacher[..., None])
  return dz


def _tiled_bwd(meta, res, cotangents):
  hidden, weights, targets, base, teacher, norms, entropy_tiles, kl_teacher_tiles = res
  tile, dtype, (layout, _, _) = meta
  cots = tuple(_to_tiles(c.astype(jnp.float32), tile) for c in cotangents)  # each [N, B, T]
  xs = (
    _to_tiles(hidden, tile),
    _to_tiles(targets.astype(jnp.int32), tile),
    None if base is None else _to_tiles(base[0], tile),
    None if teacher is None else _to_tiles(teacher[0], tile),
    norms,
    (entropy_tiles, kl_teacher_tiles),
    cots,
  )

  def body(d_weights, x):
    h, y, hb, ht, norm, stat, cot = x
    b = None if base is None else (hb, base[1])
    t = None if teacher is None else (ht, teacher[1])
    dz = _tile_logits_grad(meta, h, weights, y, b, t, norm, stat, cot).astype(dtype)  # [B, T, V]
    w = weights.astype(dtype)
    if layout == "ev":  # z = h W: dh = dz W^T, dW = h^T dz
      d_h = jnp.einsum("btv,ev->bte", dz, w, preferred_element_type=jnp.float32)
      d_w = jnp.einsum("bte,btv->ev", h.astype(dtype), dz, preferred_element_type=jnp.float32)
    else:  # z = h W^T with W [V, E]: dh = dz W, dW = dz^T h
      d_h = jnp.einsum("btv,ve->bte", dz, w, preferred_element_type=jnp.float32)
      d_w = jnp.einsum("btv,bte->ve", dz, h.astype(dtype), preferred_element_type=jnp.float32)
    return d_weights + d_w, d_h.astype(hidden.dtype)

  zero = jnp.zeros(weights.shape, jnp.float32)
  d_weights, d_hidden = jax.lax.scan(body, zero, xs)
  d_hidden = _from_tiles(d_hidden, hidden.shape[1])
  frozen = lambda head: None if head is None else jax.tree.map(jnp.zeros_like, head)
  return d_hidden, d_weights.astype(weights.dtype), None, frozen(base), frozen(teacher)


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def dense_head_stats(
  student: Head, targets, *, base: Head | None = None, teacher: Head | None = None,
  compute_dtype=None,
) -> HeadStats:  # fmt: skip
  """The same statistics from full [B, L, V] logits: the reference, and the `dense` path."""
  _check(student, targets, base, teacher)
  dtype = jnp.dtype(compute_dtype or student.hidden.dtype)
  logits = lambda head: head_logits(head.hidden, head.weights, head.layout, dtype)
  logp, _ = _log_softmax_parts(logits(student))  # [B, L, V]
  p = jnp.exp(logp)
  logprob = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  entropy = -jnp.sum(p * logp, axis=-1)
  kl_base = kl_teacher = None
  if base is not None:
    logp_b = jax.lax.stop_gradient(_log_softmax_parts(logits(base))[0])
    kl_base = jnp.sum(jnp.exp(logp_b) * (logp_b - logp), axis=-1)
  if teacher is not None:
    logp_t = jax.lax.stop_gradient(_log_softmax_parts(logits(teacher))[0])
    kl_teacher = jnp.sum(p * (logp - logp_t), axis=-1)
  return HeadStats(logprob, entropy, kl_base, kl_teacher)
