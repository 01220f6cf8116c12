"""The LM head and every per-token quantity the losses need, without ever holding [B, L, V] logits.

At the paper's scale one row of 8192 tokens over a 151,936-token vocabulary is 4.6 GiB of float32
logits, and the exact KL needs the frozen base's as well. `head_stats` goes from final hidden
states [B, L, E] and the head weights straight to per-token statistics [B, L]:

  logprob     log p(y_t) of the target token              (OmniOPD, GRPO, sampled OPD, SFT)
  entropy     H(p) over the full vocabulary               (metrics, fork selection)
  kl_base     KL(p_base || p), the base head recomputed   (the KL anchor)
  kl_teacher  KL(p || p_teacher), a same-tokenizer teacher (white-box OPD, full vocabulary)

It walks the vocabulary in tiles of `vocab_tile` entries (`lax.scan`): each tile's logits
[B, L, T] are computed for every position, folded into running (online-softmax) sums, and dropped.
A `jax.custom_vjp` makes the backward pass walk the same tiles: it recomputes the tile's logits
from the hidden states and the saved per-token log-normalisers, forms d loss / d logits for that
tile in closed form and contracts it at once into the hidden-state gradient (a [B, L, E] carry) and
that tile's slice of the head gradient, so the backward never holds [B, L, V] either (the idea of
MaxText's vocabulary tiling and Tunix's chunked log-probs; the code is ours). Tiling the
vocabulary rather than the sequence also bounds the head's FSDP traffic: each step gathers one
[E, T] slice of the weights and reduces one [E, T] slice of its gradient, never the whole head.
Only the student is differentiated: base and teacher inputs get zero cotangents.

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
TILE_BYTES = 128 * 1024**2  # default tile: the batch's float32 [B * L, T] logits stay under this
MAX_TILE = 8192  # and at most this many entries: one [E, T] slice of the head, not all of it


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


def default_vocab_tile(vocab_size: int, tokens: int) -> int:
  """Vocabulary entries per tile: a power of two in [128, MAX_TILE] whose float32 [tokens, T]
  logits fit TILE_BYTES, at most the vocabulary. `tokens` is B x L of the (global) batch."""
  t = min(max(TILE_BYTES // (4 * tokens), 128), MAX_TILE)
  return max(1, min(2 ** int(math.log2(t)), vocab_size))


def head_logits(hidden, weights, layout: str, compute_dtype) -> jax.Array:
  """[..., E] x head -> float32 logits [..., V] (the matmul in compute_dtype, float32 result)."""
  h = hidden.astype(compute_dtype)
  w = weights.astype(compute_dtype)
  # Tied [V, E] weights are transposed here, on what is read (a tile): a dot contracting their
  # trailing axis makes XLA's CPU layout assignment keep a transposed copy of the whole head.
  w = w if layout == "ev" else w.T  # [E, V]
  dims = (((h.ndim - 1,), (0,)), ((), ()))
  return jax.lax.dot_general(h, w, dims, preferred_element_type=jnp.float32)


def head_stats(
  student: Head,
  targets: jax.Array,
  *,
  base: Head | None = None,
  teacher: Head | None = None,
  vocab_tile: int | None = None,
  compute_dtype=None,
  constrain_rows=None,
  constrain_head=None,
) -> HeadStats:
  """Per-token log-prob, entropy and the requested KLs, tiled over the vocabulary.

  Args:
    student: the trained model's Head; hidden [B, L, E] predicts targets [B, L] (int).
    base: the frozen base's Head (same vocabulary) for kl_base, or None.
    teacher: a same-tokenizer teacher's Head for kl_teacher, or None.
    vocab_tile: vocabulary entries per tile (default: default_vocab_tile); any V works (the last
      tile is padded inside).
    compute_dtype: dtype of the head matmuls (default: the student's hidden dtype).
    constrain_rows, constrain_head: optional sharding constraints (e.g. with_sharding_constraint)
      for [B, L, ...] arrays (rows over the batch axes) and for head-layout arrays, whole or one
      tile (the student weights' own sharding). Inside the tile loop GSPMD otherwise may
      replicate rows, or hold the head gradient whole on every device.

  Returns:
    HeadStats of [B, L] float32 arrays; differentiable in student.hidden and student.weights.
  """
  _check(student, targets, base, teacher)
  vocab = _vocab(student)
  tile = min(vocab_tile or default_vocab_tile(vocab, targets.size), vocab)
  dtype = jnp.dtype(compute_dtype or student.hidden.dtype)
  # Frozen models enter as (hidden, weights) pairs without gradient; layouts are static metadata.
  frozen = tuple(
    None if h is None else jax.lax.stop_gradient((h.hidden, h.weights)) for h in (base, teacher)
  )
  layouts = (student.layout,) + tuple(None if h is None else h.layout for h in (base, teacher))
  same = lambda x: x
  meta = _Meta(tile, vocab, dtype, layouts, constrain_rows or same, constrain_head or same)
  logprob, entropy, kl_base, kl_teacher = _tiled(
    meta, student.hidden, student.weights, targets, *frozen
  )
  return HeadStats(
    logprob, entropy, None if base is None else kl_base, None if teacher is None else kl_teacher
  )


class _Meta(NamedTuple):
  """Static settings of one head_stats call (the custom VJP's non-differentiable argument)."""

  tile: int  # vocabulary entries per tile
  vocab: int  # real vocabulary size (the last tile is padded past it)
  dtype: jnp.dtype
  layouts: tuple  # (student, base, teacher) head layouts
  rows: object  # callable: sharding constraint for [B, L, ...] arrays
  head: object  # callable: sharding constraint for head-layout arrays (whole or one tile)


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


def _tile_start(meta, j):
  """First vocabulary entry of tile j. The last tile ends at the vocabulary's end (it overlaps the
  one before when T does not divide V), so every tile is a slice of the weights as they are: no
  padded or stacked copy of the head exists."""
  return jnp.minimum(j * meta.tile, meta.vocab - meta.tile)


def _weight_tile(weights, layout, start, tile):
  """Head entries start .. start + tile - 1: [E, T] ("ev") or [T, E] ("ve"), stored dtype."""
  return jax.lax.dynamic_slice_in_dim(weights, start, tile, axis=1 if layout == "ev" else 0)


def _fresh(meta, j):
  """[T] bool: the tile's entries that no earlier tile covered (all but the last tile's overlap)."""
  return _tile_start(meta, j) + jnp.arange(meta.tile) >= j * meta.tile


def _tile_logits(meta, h, w_tile, layout, j):
  """float32 logits [B, L, T] of tile j; entries an earlier tile covered are -inf-like."""
  z = meta.rows(head_logits(h, w_tile, layout, meta.dtype))
  return jnp.where(_fresh(meta, j), z, _NEG)


_NEG = -1e30  # logits of padded vocabulary entries: exp() underflows to exactly 0


def _online(m, z):
  """One online-softmax step: m the running max [B, L], z this tile's logits [B, L, T]. Returns
  the new max and the factor that rescales sums kept relative to the old max."""
  m_new = jnp.maximum(m, z.max(-1))
  return m_new, jnp.exp(m - m_new)


def _num_tiles(meta) -> int:
  return -(-meta.vocab // meta.tile)


def _tiles_at(meta, j, weights, base, teacher):
  """Tile j of the student's, the base's and the teacher's head weights (None where absent)."""
  start = _tile_start(meta, j)
  layout, base_layout, teacher_layout = meta.layouts
  tile = lambda w, lay: meta.head(_weight_tile(w, lay, start, meta.tile))
  return (
    tile(weights, layout),
    None if base is None else _weight_tile(base[1], base_layout, start, meta.tile),
    None if teacher is None else _weight_tile(teacher[1], teacher_layout, start, meta.tile),
  )


def _scan_forward(meta, hidden, weights, targets, base, teacher):
  """Per-token statistics and log-normalisers [B, L] in one pass over the vocabulary tiles."""
  layout, base_layout, teacher_layout = meta.layouts
  h = meta.rows(hidden.astype(meta.dtype))
  hb = None if base is None else meta.rows(base[0].astype(meta.dtype))
  ht = None if teacher is None else meta.rows(teacher[0].astype(meta.dtype))
  y = targets.astype(jnp.int32)

  def body(carry, j):
    w, wb, wt = _tiles_at(meta, j, weights, base, teacher)
    c = dict(carry)
    z = _tile_logits(meta, h, w, layout, j)  # [B, L, T]
    m, scale = _online(c["m"], z)
    e = jnp.exp(z - m[..., None])
    c["m"], c["s"] = m, c["s"] * scale + e.sum(-1)
    c["sz"] = c["sz"] * scale + (e * z).sum(-1)  # sum_v exp(z - m) z: the entropy's term
    hit = (y >= j * meta.tile) & (y < (j + 1) * meta.tile)
    local = jnp.clip(y - _tile_start(meta, j), 0, meta.tile - 1)
    picked = jnp.take_along_axis(z, local[..., None], -1)[..., 0]
    c["zy"] = jnp.where(hit, picked, c["zy"])
    if wb is not None:
      zb = _tile_logits(meta, hb, wb, base_layout, j)
      mb, scale_b = _online(c["mb"], zb)
      eb = jnp.exp(zb - mb[..., None])
      c["mb"], c["sb"] = mb, c["sb"] * scale_b + eb.sum(-1)
      c["sbd"] = c["sbd"] * scale_b + (eb * (zb - z)).sum(-1)  # sum exp(zb - mb) (zb - z)
    if wt is not None:
      zt = _tile_logits(meta, ht, wt, teacher_layout, j)
      mt, scale_t = _online(c["mt"], zt)
      c["mt"], c["st"] = mt, c["st"] * scale_t + jnp.exp(zt - mt[..., None]).sum(-1)
      c["std"] = c["std"] * scale + (e * (z - zt)).sum(-1)  # sum exp(z - m) (z - zt)
    return c, None

  zeros = jnp.zeros(targets.shape, jnp.float32)
  names = (
    ["s", "sz", "zy"] + ["sb", "sbd"] * (base is not None) + ["st", "std"] * (teacher is not None)
  )
  init = {k: zeros for k in names}
  init.update({k: zeros + _NEG for k in ("m", "mb", "mt")})
  c, _ = jax.lax.scan(body, init, jnp.arange(_num_tiles(meta)))
  lse = c["m"] + jnp.log(c["s"])
  logprob = c["zy"] - lse
  entropy = lse - c["sz"] / c["s"]  # H = lse - E_p[z]
  kl_base = lse_base = kl_teacher = lse_teacher = zeros
  if base is not None:
    lse_base = c["mb"] + jnp.log(c["sb"])
    kl_base = c["sbd"] / c["sb"] - lse_base + lse  # E_pb[zb - z] - lse_b + lse
  if teacher is not None:
    lse_teacher = c["mt"] + jnp.log(c["st"])
    kl_teacher = c["std"] / c["s"] - lse + lse_teacher  # E_p[z - zt] - lse + lse_t
  return (logprob, entropy, kl_base, kl_teacher), (lse, lse_base, lse_teacher)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(meta, hidden, weights, targets, base, teacher):
  return _scan_forward(meta, hidden, weights, targets, base, teacher)[0]


def _tiled_fwd(meta, hidden, weights, targets, base, teacher):
  stats, norms = _scan_forward(meta, hidden, weights, targets, base, teacher)
  # Saved for the backward: the inputs and [B, L] normalisers and statistics, never logits.
  return stats, (hidden, weights, targets, base, teacher, norms, stats[1], stats[3])


def _tiled_bwd(meta, res, cotangents):
  """One pass over the vocabulary tiles: d z of the tile [B, L, T] in closed form, contracted at
  once into d hidden (a [B, L, E] float32 carry) and its slice of the head gradient (a carry of
  the head's shape, written in place)."""
  hidden, weights, targets, base, teacher, (lse, lse_b, lse_t), entropy, kl_t = res
  layout, base_layout, teacher_layout = meta.layouts
  g_lp, g_h, g_kb, g_kt = (c.astype(jnp.float32)[..., None] for c in cotangents)  # [B, L, 1]
  h = meta.rows(hidden.astype(meta.dtype))
  hb = None if base is None else meta.rows(base[0].astype(meta.dtype))
  ht = None if teacher is None else meta.rows(teacher[0].astype(meta.dtype))
  y = targets.astype(jnp.int32)[..., None]  # [B, L, 1]
  axis = 1 if layout == "ev" else 0  # the head's vocabulary axis

  def body(carry, j):
    d_h, d_weights = carry
    w, wb, wt = _tiles_at(meta, j, weights, base, teacher)
    start = _tile_start(meta, j)
    logp = _tile_logits(meta, h, w, layout, j) - lse[..., None]  # [B, L, T]
    p = jnp.exp(logp)  # 0 on entries an earlier tile covered
    onehot = ((y - start == jnp.arange(meta.tile)) & _fresh(meta, j)).astype(jnp.float32)
    dz = g_lp * (onehot - p) - g_h * p * (logp + entropy[..., None])
    if wb is not None:
      p_b = jnp.exp(_tile_logits(meta, hb, wb, base_layout, j) - lse_b[..., None])
      dz = dz + g_kb * (p - p_b)
    if wt is not None:
      logp_t = _tile_logits(meta, ht, wt, teacher_layout, j) - lse_t[..., None]
      dz = dz + g_kt * p * (logp - logp_t - kl_t[..., None])
    dz = meta.rows(dz.astype(meta.dtype))
    w = w.astype(meta.dtype)
    if layout == "ev":  # z = h W: dh = dz W^T, dW = h^T dz
      d_hj = jnp.einsum("blt,et->ble", dz, w, preferred_element_type=jnp.float32)
      d_w = jnp.einsum("ble,blt->et", h, dz, preferred_element_type=jnp.float32)
    else:  # z = h W^T with W [V, E]: dh = dz W, dW = dz^T h
      d_hj = jnp.einsum("blt,te->ble", dz, w, preferred_element_type=jnp.float32)
      d_w = jnp.einsum("blt,ble->te", dz, h, preferred_element_type=jnp.float32)
    # Written in place into the head-shaped gradient; the overlap an earlier tile wrote keeps
    # its value (its d_w rows are exactly 0 here).
    fresh = _fresh(meta, j)[:, None] if axis == 0 else _fresh(meta, j)[None, :]
    old = jax.lax.dynamic_slice_in_dim(d_weights, start, meta.tile, axis)
    d_w = meta.head(jnp.where(fresh, d_w.astype(weights.dtype), old))
    d_weights = jax.lax.dynamic_update_slice_in_dim(d_weights, d_w, start, axis)
    return (meta.rows(d_h + d_hj), meta.head(d_weights)), None

  init = (jnp.zeros(hidden.shape, jnp.float32), meta.head(jnp.zeros_like(weights)))
  (d_hidden, d_weights), _ = jax.lax.scan(body, init, jnp.arange(_num_tiles(meta)))
  frozen = lambda head: None if head is None else jax.tree.map(jnp.zeros_like, head)
  return (d_hidden.astype(hidden.dtype), d_weights, None, frozen(base), frozen(teacher))


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def _log_softmax_parts(z):
  """float32 logits [..., V] -> (log p, log-normaliser [...])."""
  lse = jax.nn.logsumexp(z, axis=-1)
  return z - lse[..., None], lse


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
