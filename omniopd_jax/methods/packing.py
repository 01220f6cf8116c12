"""Packed sequences for the update: a step's rows laid end to end in token-budget rows.

Padded, every row of the update is as long as the longest possible response (P + L tokens); with
long-tailed math responses most of that is padding, and every padding token costs a full forward
and backward. Packed (`config.pack_sequences`), the host lays each row's real tokens (prompt, then
response) end to end, first-fit-decreasing, into rows of `config.pack_tokens` tokens. Every token
keeps its position in its own sequence (RoPE restarts at 0) and carries a segment id (1..n within
its packed row, 0 for padding): attention stays causal within a segment (ops/attention.py), so a
sequence sees exactly what it saw padded. The frozen base and the in-process teacher run on the
same layout.

What each method reads per row (advantages, chunk weights, old and teacher log-probs) comes as
per-token fields at the positions that predict the response tokens (`Method.token_fields`). The
losses' reductions are global sums with global normalisers (rows with a response token, response
tokens) counted on device over the whole batch before the micro-batch split (`with_totals`), so a
packed update gives the padded update's loss and gradients whatever the micro-batch split.

Micro-batches split packed rows, and hold at most the tokens of a padded micro-batch (its rows x
(P + L)): the memory plan of the padded update still bounds the packed one. What packing saves is
micro-batches: a step runs as many as its packed rows need (`packed_shape`, at most
config.micro_batches), each of a bucketed number of rows (`bucket_rows`: a multiple of this
process's devices on the batch axes, rounded up to four significant bits), so a run compiles the
few shapes its packed counts visit, not one per step.
"""

import math
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from omniopd_jax.methods import base

SIGNIFICANT_BITS = 4  # bucket granularity: under 1/8 of the packed rows are bucket padding


@flax.struct.dataclass
class PackedBatch:
  """A step's rows packed end to end: R packed rows of S tokens (S = the token budget)."""

  tokens: Any  # [R, S] int32: each sequence's prompt then response, end to end; 0 = padding
  positions: Any  # [R, S] int32: position within its own sequence (restarts at 0)
  segment_ids: Any  # [R, S] int32: 1..n, the sequence of each token in its packed row; 0 = padding
  targets: Any  # [R, S] int32: the response token each position predicts (0 where none)
  loss_mask: Any  # [R, S] bool: positions that predict a response token
  row_first: Any  # [R, S] bool: the first such position of each sequence (counts it once)
  fields: Any  # dict: name -> [R, S], the method's per-token quantities (Method.token_fields)
  loss_rows: Any = None  # [R] float32, on device: rows with a response token, global / micro
  loss_tokens: Any = None  # [R] float32, on device: response tokens, global / micro
  response_len: int = flax.struct.field(pytree_node=False, default=0)  # padded L (norm default)
  micro_batches: int = flax.struct.field(pytree_node=False, default=1)  # R splits into these


class Placement(NamedTuple):
  """Where each original row went: row b is packed row `packed_row[b]` from `start[b]`."""

  packed_row: np.ndarray  # [B] int, -1 for rows without a response token (nothing to train)
  start: np.ndarray  # [B] int
  length: np.ndarray  # [B] int: prompt + response tokens


def row_lengths(seq: base.Sequences) -> tuple[np.ndarray, np.ndarray]:
  """(prompt tokens [B], response tokens [B]) of a padded numpy batch, checked for packing."""
  p = seq.tokens.shape[1] - seq.response_tokens.shape[1]
  attention_mask = np.asarray(seq.attention_mask, bool)
  response_mask = np.asarray(seq.response_mask, bool)
  n_prompt = attention_mask[:, :p].sum(1)
  n_response = response_mask.sum(1)
  prefix = np.arange(response_mask.shape[1])[None] < n_response[:, None]
  if not (response_mask == prefix).all():
    bad = int(np.flatnonzero((response_mask != prefix).any(1))[0])
    raise ValueError(f"packing: row {bad}'s response mask is not a prefix of its response")
  orphan = (n_prompt == 0) & (n_response > 0)
  if orphan.any():
    raise ValueError(
      f"packing: row {int(np.flatnonzero(orphan)[0])} has no prompt token, so nothing predicts "
      "its first response token"
    )
  return n_prompt, n_response


def first_fit_decreasing(lengths, budget: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Bins sequences of `lengths` [B] into rows of `budget` tokens, longest first.

  Returns (bin [B], start [B], number of bins); a zero length gets bin -1. Ties keep row order,
  so the layout is a pure function of the lengths.
  """
  lengths = np.asarray(lengths, np.int64)
  too_long = lengths > budget
  if too_long.any():
    b = int(np.flatnonzero(too_long)[0])
    raise ValueError(
      f"packing: row {b} has {int(lengths[b])} tokens (prompt + response), more than the "
      f"pack_tokens budget of {budget}; raise config.pack_tokens (0 = the padded row length)"
    )
  bins, starts = np.full(len(lengths), -1), np.zeros(len(lengths), np.int64)
  free: list[int] = []  # tokens left in each bin
  for b in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    if lengths[b] == 0:
      continue
    k = next((j for j, room in enumerate(free) if room >= lengths[b]), len(free))
    if k == len(free):
      free.append(budget)
    bins[b], starts[b] = k, budget - free[k]
    free[k] -= int(lengths[b])
  return bins, starts, len(free)


def bucket_rows(n: int, unit: int) -> int:
  """Packed rows for `n` bins: a multiple of `unit`, the multiple rounded up to four
  significant bits (1..16, 18, 20, ..., 32, 36, ...): few shapes, under 1/8 extra rows."""
  k = max(-(-n // unit), 1)
  step = 2 ** max(k.bit_length() - SIGNIFICANT_BITS, 0)
  return -(-k // step) * step * unit


def packed_shape(bins: int, unit: int = 1, cap: int = 0) -> tuple[int, int]:
  """(micro-batches, rows per micro-batch) for `bins` packed rows.

  Rows per micro-batch are a bucketed multiple of `unit` (the batch axes' devices) and at most
  `cap` (the padded micro-batch's rows; 0: no cap); as few micro-batches as that allows.
  """
  cap = max(cap // unit, 1) * unit if cap else bucket_rows(bins, unit)
  micro = max(-(-bins // cap), 1)
  return micro, min(bucket_rows(-(-bins // micro), unit), cap)


def pack(seq: base.Sequences, fields: dict, *, budget: int = 0, unit: int = 1, cap: int = 0,
         bins: int = 0) -> tuple[PackedBatch, Placement]:  # fmt: skip
  """Packs a padded numpy batch (Sequences [B, P + L] and the method's `fields`) into rows.

  Args:
    seq: left-padded prompts then right-padded responses (methods.base.pack's layout).
    fields: name -> [B, L] per response token or [B] per row (broadcast to the row's tokens).
    budget: tokens per packed row (0: the padded row length P + L).
    unit, cap: rows per micro-batch are a multiple of `unit`, at most `cap` (packed_shape).
    bins: shape the batch for at least this many packed rows (the largest count over processes).

  Returns:
    (PackedBatch of numpy arrays, Placement of the original rows).
  """
  tokens = np.asarray(seq.tokens)
  width = tokens.shape[1]
  length = seq.response_tokens.shape[1]
  budget = budget or width
  n_prompt, n_response = row_lengths(seq)
  n = np.where(n_response > 0, n_prompt + n_response, 0)
  rows, starts, count = first_fit_decreasing(n, budget)
  micro, per_micro = packed_shape(max(count, bins), unit, cap)
  r = micro * per_micro
  out = {k: np.zeros((r, budget), np.int32) for k in ("tokens", "positions", "segment_ids")}
  targets = np.zeros((r, budget), np.int32)
  loss_mask, row_first = np.zeros((r, budget), bool), np.zeros((r, budget), bool)
  packed_fields = {k: np.zeros((r, budget), np.asarray(v).dtype) for k, v in fields.items()}
  segments = np.zeros(r, np.int32)
  prompt_len = width - length
  real_prompt = np.asarray(seq.attention_mask, bool)[:, :prompt_len]
  for i in np.flatnonzero(rows >= 0):
    k, s, p_i, l_i = rows[i], starts[i], n_prompt[i], n_response[i]
    segments[k] += 1
    span = slice(s, s + p_i + l_i)
    prompt = tokens[i, :prompt_len][real_prompt[i]]
    out["tokens"][k, span] = np.concatenate([prompt, tokens[i, prompt_len : prompt_len + l_i]])
    out["positions"][k, span] = np.arange(p_i + l_i)
    out["segment_ids"][k, span] = segments[k]
    predict = slice(s + p_i - 1, s + p_i - 1 + l_i)  # position j predicts the token at j + 1
    targets[k, predict] = seq.response_tokens[i, :l_i]
    loss_mask[k, predict], row_first[k, s + p_i - 1] = True, True
    for name, v in fields.items():
      v = np.asarray(v)
      packed_fields[name][k, predict] = v[i, :l_i] if v.ndim == 2 else v[i]
  batch = PackedBatch(
    **out, targets=targets, loss_mask=loss_mask, row_first=row_first, fields=packed_fields,
    response_len=length, micro_batches=micro,
  )  # fmt: skip
  return batch, Placement(rows, starts, n)


def with_totals(batch: PackedBatch) -> PackedBatch:
  """Adds the losses' global normalisers (device, the global batch, before any micro-split).

  Each micro-batch's loss is its share of the global sums over these totals divided by the
  number of micro-batches; the accumulation averages them, so the update sees the global loss.
  """
  r, micro = batch.tokens.shape[0], batch.micro_batches
  per_row = lambda x: jnp.full((r,), x.astype(jnp.float32) / micro)  # [R]: survives the split
  return batch.replace(
    loss_rows=per_row(batch.row_first.sum()), loss_tokens=per_row(batch.loss_mask.sum())
  )


class Totals(NamedTuple):
  """The global normalisers a packed (micro-)batch's reductions divide by (losses.masked_reduce)."""

  rows: jax.Array  # [] float32: rows with a response token (per micro-batch share)
  tokens: jax.Array  # [] float32: response tokens (per micro-batch share)


def totals(batch: PackedBatch) -> Totals:
  """The batch's Totals (with_totals must have run)."""
  if batch.loss_rows is None:
    raise ValueError("packed batch without totals: call packing.with_totals on the global batch")
  return Totals(rows=batch.loss_rows.max(), tokens=batch.loss_tokens.max())


def batch_devices(mesh, rules) -> int:
  """This process's devices along the batch axes: packed rows per micro-batch divide over them."""
  target = dict(rules).get("batch")
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  devices = math.prod(mesh.shape[a] for a in axes if a in mesh.shape)
  return max(devices // jax.process_count(), 1)


def pack_for_update(config, method, batch, mesh, rules) -> PackedBatch:
  """The host half of a packed update: a method's padded numpy batch -> this process's packed
  rows, each micro-batch holding at most the tokens of a padded one (config.micro_batches).
  With several processes they agree on the shape (from the largest packed count)."""
  fields = method.token_fields(config, batch)
  rows, width = batch.seq.tokens.shape
  budget = int(config.get("pack_tokens", 0)) or width
  micro = max(int(config.micro_batches), 1)
  kw = dict(budget=budget, unit=batch_devices(mesh, rules), cap=rows * width // (micro * budget))
  packed, where = pack(batch.seq, fields, **kw)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    count = int(where.packed_row.max()) + 1
    most = int(np.max(multihost_utils.process_allgather(np.int32(count))))
    if most > count:
      packed, _ = pack(batch.seq, fields, bins=most, **kw)
  return packed


def abstract_packed(config, method, rows: int, width: int, length: int) -> PackedBatch:
  """A PackedBatch of jax.ShapeDtypeStructs ([rows, width]) for `method` (compile checks)."""
  s = jax.ShapeDtypeStruct
  shapes = method.abstract_batch(config, 1, width - length, length)
  probe = method.token_fields(config, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes))
  grid = lambda dtype: s((rows, width), dtype)
  return PackedBatch(
    tokens=grid(jnp.int32), positions=grid(jnp.int32), segment_ids=grid(jnp.int32),
    targets=grid(jnp.int32), loss_mask=grid(jnp.bool_), row_first=grid(jnp.bool_),
    fields={k: grid(np.asarray(v).dtype) for k, v in probe.items()}, response_len=length,
  )  # fmt: skip
