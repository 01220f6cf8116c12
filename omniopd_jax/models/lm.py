"""The student/teacher model family in Flax NNX: Llama (SmolLM2, Llama-3 RoPE), Qwen2/2.5, Qwen3.

One decoder covers all three: they differ only in q/k/v/o biases, per-head q/k RMSNorm and the RoPE
variant. Parameters carry logical axis names (`logical_axes` metadata) that `sharding.py` maps onto
the mesh; nothing here knows mesh axis names.
"""

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from omniopd_jax.models import layer_scan
from omniopd_jax.ops import attention as attention_ops
from omniopd_jax.ops import token_chunks

ROPE_TYPES = ("default", "linear", "llama3")
# Logical axes of the KV cache: keys [B, KV, D, S], values [B, KV, S, D] (see Attention).
K_CACHE_AXES = ("batch", "kv_heads", "head_dim", None)
V_CACHE_AXES = ("batch", "kv_heads", None, "head_dim")
ARCHITECTURES = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters, named as transformers names them where possible."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  architecture: str = "llama"  # llama | qwen2 | qwen3
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"  # default | linear | llama3
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_position_embeddings: int = 8192  # llama3 only
  max_position_embeddings: int = 2048
  qkv_bias: bool = False  # Qwen2 always, Llama/Qwen3 when attention_bias
  o_bias: bool = False  # Llama/Qwen3 when attention_bias
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
  tie_word_embeddings: bool = False
  # Not an architecture field: one DecoderLayer whose parameters carry a leading [L] axis, run by
  # jax.lax.scan (one layer compiled, not L), with a stacked KV cache. Same values as unrolled.
  scan_layers: bool = False

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture={self.architecture!r}: supported are {ARCHITECTURES}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_type!r}: supported are {ROPE_TYPES}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads={self.num_attention_heads} is not a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}"
      )

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  def num_params(self) -> int:
    e, f, d = self.hidden_size, self.intermediate_size, self.dim_per_head
    h, kv = self.num_attention_heads, self.num_key_value_heads
    attn = e * d * (2 * h + 2 * kv) + self.qkv_bias * d * (h + 2 * kv) + self.o_bias * e
    layer = attn + 3 * e * f + self.mlp_bias * (2 * f + e) + 2 * e + self.qk_norm * 2 * d
    head = 0 if self.tie_word_embeddings else e * self.vocab_size
    return self.vocab_size * e + self.num_hidden_layers * layer + e + head


@flax.struct.dataclass
class SegmentMask:
  """The training/prefill mask as segment ids [B, T] for a fused attention (ops/attention.py).

  Query t sees key s iff s <= t and both have the same id (0 = padding, 1, 2, ... = sequences).
  """

  segment_ids: jax.Array  # [B, T] int32
  implementation: str = flax.struct.field(pytree_node=False, default="blockwise")


def _param(rngs, init, shape, axes, dtype):
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class Dense(nnx.Module):
  """y = x . W (+ b) over the trailing `len(in_shape)` axes; W has logical axes `axes`."""

  def __init__(self, in_shape, out_shape, axes, *, use_bias, param_dtype, dtype, rngs, std=0.02):
    self.in_shape, self.out_shape, self.dtype = tuple(in_shape), tuple(out_shape), dtype
    init = nnx.initializers.normal(std)
    self.kernel = _param(rngs, init, self.in_shape + self.out_shape, axes, param_dtype)
    bias_axes = axes[len(self.in_shape) :]
    zeros = nnx.initializers.zeros
    self.bias = _param(rngs, zeros, self.out_shape, bias_axes, param_dtype) if use_bias else None

  def __call__(self, x):
    n_in = len(self.in_shape)
    y = jax.lax.dot_general(
      x.astype(self.dtype),
      self.kernel[...].astype(self.dtype),
      (((tuple(range(x.ndim - n_in, x.ndim))), tuple(range(n_in))), ((), ())),
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """transformers' RMSNorm: normalise in float32, cast back, then scale (order matters in bf16)."""

  def __init__(self, dim, eps, *, param_dtype, axes=("norm",)):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=axes)

  def __call__(self, x):
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(dtype) * x32.astype(dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse RoPE frequencies [D/2] for the configured rope type (float32)."""
  d = cfg.dim_per_head
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  if cfg.rope_type == "linear":
    inv = inv / cfg.rope_factor
  elif cfg.rope_type == "llama3":
    old_len = cfg.rope_original_max_position_embeddings
    low_wavelen = old_len / cfg.rope_low_freq_factor
    high_wavelen = old_len / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
    smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = jnp.where(medium, smoothed, scaled)
  return inv


def apply_rope(x, positions, inv_freq):
  """Rotate-half RoPE as transformers applies it. x: [B, T, H, D], positions: [B, T]."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class Attention(nnx.Module):
  """Grouped-query attention with optional q/k/v/o biases, q/k RMSNorm and a KV cache."""

  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
    e, d = cfg.hidden_size, cfg.dim_per_head
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
    self.q_proj = Dense((e,), (h, d), ("embed", "heads", "head_dim"), use_bias=cfg.qkv_bias, **kw)
    self.k_proj = Dense(
      (e,), (kv, d), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, **kw
    )
    self.v_proj = Dense(
      (e,), (kv, d), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, **kw
    )
    self.o_proj = Dense((h, d), (e,), ("heads", "head_dim", "embed"), use_bias=cfg.o_bias, **kw)
    norm = lambda: RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, axes=("head_dim",))
    self.q_norm = norm() if cfg.qk_norm else None
    self.k_norm = norm() if cfg.qk_norm else None
    self.groups = h // kv
    self.scale = d**-0.5

  def __call__(self, x, positions, inv_freq, mask, cache=None, cache_index=None):
    """x: [B, T, E]; mask: [B, T, S] bool over the key slots, or a SegmentMask (no cache) for a
    fused attention; cache: (k, v) or None (init_cache)."""
    q = self.queries(x, positions, inv_freq)  # [B, T, H, D]
    k, v = self.keys_values(x, positions, inv_freq)  # [B, T, KV, D]
    if hasattr(cache, "write_and_attend"):  # a paged decode cache (rollout/paged_cache.py)
      out, cache = cache.write_and_attend(q, k, v, self.scale)
      return self._out(out), cache
    if isinstance(mask, SegmentMask):  # training / prefill: no [T, T] scores
      out = attention_ops.attention(
        q, k, v, mask.segment_ids, implementation=mask.implementation, scale=self.scale
      )  # [B, T, H, D]
      return self._out(out), cache
    keys = values = "bskd"  # einsum layouts of k and v: as projected, or as cached
    if isinstance(cache, layer_scan.StackedKVCache):  # scanned: this layer's slice of them all
      cache, k, v = cache.write(k, v, cache_index)
      k, v = k.astype(x.dtype), v.astype(x.dtype)
      keys, values = "bkds", "bksd"
    elif cache is not None:
      # Per head, keys are cached as [D, S] and values as [S, D]: both attention matmuls of a
      # decode step then read the cache in its own layout (q [G, D] x [D, S], p [G, S] x [S, D]),
      # with no transpose of the cache at any step (the [S, KV, D] layout cost 12% of a step).
      write = lambda c, new, perm, axis: jax.lax.dynamic_update_slice_in_dim(
        c, new.transpose(perm).astype(c.dtype), cache_index, axis
      )
      cache = (write(cache[0], k, (0, 2, 3, 1), 3), write(cache[1], v, (0, 2, 1, 3), 2))
      k, v = cache[0].astype(x.dtype), cache[1].astype(x.dtype)
      keys, values = "bkds", "bksd"
    b, t, h, d = q.shape
    if t == 1 and cache is not None:
      return self._out(self._attend_one(q, k, v, mask)), cache
    q = q.reshape(b, t, h // self.groups, self.groups, d)  # [B, T, KV, G, D]
    scores = jnp.einsum(f"btkgd,{keys}->bkgts", q, k).astype(jnp.float32) * self.scale
    # A large finite negative (not -inf) keeps fully masked rows (padding queries) NaN-free.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)  # softmax in float32, as transformers
    out = jnp.einsum(f"bkgts,{values}->btkgd", probs, v).reshape(b, t, h, d)
    return self._out(out), cache

  def queries(self, x, positions, inv_freq):
    """x [B, T, E] -> q [B, T, H, D]: projected, normed (Qwen3) and rotated."""
    names = layer_scan.ATTENTION_PROJECTIONS  # what remat "dots_except_mlp" saves
    q = checkpoint_name(self.q_proj(x), names[0])
    q = q if self.q_norm is None else self.q_norm(q)
    return apply_rope(q, positions, inv_freq)

  def keys_values(self, x, positions, inv_freq):
    """x [B, T, E] -> (k, v) [B, T, KV, D]: k projected, normed (Qwen3) and rotated."""
    names = layer_scan.ATTENTION_PROJECTIONS
    k = checkpoint_name(self.k_proj(x), names[1])
    v = checkpoint_name(self.v_proj(x), names[2])
    k = k if self.k_norm is None else self.k_norm(k)
    return apply_rope(k, positions, inv_freq), v

  def _out(self, out):
    return checkpoint_name(self.o_proj(out), layer_scan.ATTENTION_PROJECTIONS[3])

  def _attend_one(self, q, k, v, mask):
    """One query token (decode): q [B, 1, H, D], k [B, KV, D, S], v [B, KV, S, D] -> [B, 1, H, D]."""
    b, _, h, d = q.shape
    q = q.reshape(b, h // self.groups, self.groups, d)  # [B, KV, G, D]
    scores = jnp.einsum("bkgd,bkds->bkgs", q, k).astype(jnp.float32) * self.scale
    scores = jnp.where(mask[:, :, None, :], scores, jnp.finfo(jnp.float32).min)  # mask [B, 1, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # float32 softmax, as transformers
    return jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(b, 1, h, d)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
    e, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(use_bias=cfg.mlp_bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
    self.gate_proj = Dense((e,), (f,), ("embed", "mlp"), **kw)
    self.up_proj = Dense((e,), (f,), ("embed", "mlp"), **kw)
    self.down_proj = Dense((f,), (e,), ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(
      cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype
    )
    self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, positions, inv_freq, mask, cache=None, cache_index=None, chunks=(0, 0)):
    """`chunks` = (mlp_chunk, layer_chunk), training only (no cache). layer_chunk > 0 with
    blockwise attention: the layer runs over query chunks of about that many tokens
    (token_chunks.decoder_layer_chunks); else mlp_chunk > 0: the norm + MLP run over sequence
    chunks of that many tokens. Chunks are recomputed in the backward pass (ops/token_chunks)."""
    mlp_chunk, layer_chunk = chunks
    if cache is None and layer_chunk > 0 and _chunkable(mask):
      y = token_chunks.decoder_layer_chunks(
        self, x, positions, inv_freq, mask.segment_ids, layer_chunk
      )
      return y, cache
    h, cache = self.self_attn(
      self.input_layernorm(x), positions, inv_freq, mask, cache, cache_index
    )
    x = x + h
    mlp = lambda x: self.mlp(self.post_attention_layernorm(x))
    if cache is None and mlp_chunk > 0:
      return x + token_chunks.map_token_chunks(mlp, x, mlp_chunk), cache
    return x + mlp(x), cache


def _chunkable(mask) -> bool:
  """Whether a layer can run over query chunks: a segment mask for blockwise attention. The fused
  kernels (cudnn, xla, splash, pallas_gpu) attend a whole sequence in one call and the dense
  path builds [T, T] scores, so with those the layer runs whole (with mlp_chunk's MLP chunks)."""
  return isinstance(mask, SegmentMask) and attention_ops.resolve(mask.implementation) == "blockwise"


class CausalLM(nnx.Module):
  """Decoder-only LM. `model(input_ids, attention_mask=...)` returns float32 logits [B, T, V].

  Padding is exact: with an `attention_mask`, positions default to `cumsum(mask) - 1`, so a left-
  or right-padded row gives the logits of the same row unpadded (at its real tokens).
  """

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs=None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config, self.dtype = cfg, jnp.dtype(dtype)
    embed_init = nnx.initializers.normal(0.02)
    self.embed_tokens = _param(
      rngs, embed_init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype
    )
    layers = [
      DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      for _ in range(cfg.num_hidden_layers)
    ]
    # scan_layers: one layer holding every layer's parameters stacked [L, ...] (built from the
    # same per-layer draws, so a seed gives the same weights either way).
    self.layers = layer_scan.stack_layers(layers) if cfg.scan_layers else nnx.List(layers)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    head_shape = (cfg.hidden_size, cfg.vocab_size)
    self.lm_head = (
      None
      if cfg.tie_word_embeddings
      else _param(rngs, embed_init, head_shape, ("embed", "vocab"), param_dtype)
    )

  def init_cache(self, batch_size: int, max_len: int, dtype=None):
    """An empty KV cache: per layer keys [B, KV, D, S] and values [B, KV, S, D] (a list of
    pairs), or with scan_layers a StackedKVCache of [L, ...] arrays (models/layer_scan.py)."""
    cfg = self.config
    k_shape = (batch_size, cfg.num_key_value_heads, cfg.dim_per_head, max_len)
    v_shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.dim_per_head)
    dtype = dtype or self.dtype
    if cfg.scan_layers:
      n = cfg.num_hidden_layers
      return layer_scan.StackedKVCache(
        jnp.zeros((n, *k_shape), dtype), jnp.zeros((n, *v_shape), dtype)
      )
    return [(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype)) for _ in self.layers]

  def hidden_states(
    self, input_ids, attention_mask=None, positions=None, *, cache=None, cache_index=None,
    remat=False, attention="dense", segment_ids=None, constrain=None, mlp_chunk=0, layer_chunk=0,
  ):  # fmt: skip
    """Final-norm hidden states [B, T, E] (and the updated cache when one is given).

    Without a cache, `attention_mask` is [B, T] over the input tokens. With a cache of S slots, the
    inputs are written at slots `cache_index .. cache_index + T - 1`, and `attention_mask` is
    [B, S] over the cache slots (True for slots holding real tokens, including the new ones).

    Without a cache, `attention` picks the implementation (ops.attention.IMPLEMENTATIONS; "dense":
    [B, T, T] scores) and `segment_ids` [B, T] (0 = padding) packs several sequences in a row
    (pass their `positions` too); by default the segments are the attention mask.

    `constrain` (e.g. a with_sharding_constraint to rows over the batch axes) is applied to the
    residual stream [B, T, E] after the embedding and after every layer: without it, GSPMD may
    follow the embedding table's fsdp sharding and replicate every row on every device.

    `mlp_chunk` > 0 (no cache): each layer's MLP runs over sequence chunks of that many tokens,
    rematerialised, so its [T, intermediate] activations are never all live (same values).
    `layer_chunk` > 0 (no cache, blockwise attention): each layer after its keys and values runs
    over query chunks of about that many tokens (token_chunks.decoder_layer_chunks); with
    another attention it is ignored and mlp_chunk applies.

    `remat` (no cache): what each layer saves for the backward pass, a REMAT_POLICIES name
    (models/layer_scan.py) or a bool (True = "full": only the layer's input, the rest recomputed; ~1/3 more compute).
    """
    constrain = constrain or (lambda x: x)
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t) if cache is None else (b, _num_slots(cache)), bool)
    attention_mask = attention_mask.astype(bool)
    if cache is None:
      if positions is None:
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
      mask = _no_cache_mask(attention_mask, segment_ids, attention)
    else:
      if cache_index is None or positions is None:
        raise ValueError("a KV-cache call needs both `cache_index` and `positions`")
      q_slots = cache_index + jnp.arange(t)
      k_slots = jnp.arange(attention_mask.shape[-1])
      causal = k_slots[None, :] <= q_slots[:, None]  # [T, S]
      mask = causal[None] & attention_mask[:, None, :]  # [B, T, S]
    inv_freq = rope_inv_freq(self.config)
    if cache is None and layer_chunk > 0 and _chunkable(mask):
      # Padded once to whole query chunks here, not in every layer: extra tokens are padding.
      count, size, _ = token_chunks.aligned_chunk_layout(t, layer_chunk, attention_ops.BLOCK)
      pad = lambda a: token_chunks.pad_tokens(a, count * size)
      input_ids, positions = pad(input_ids), pad(positions)
      mask = mask.replace(segment_ids=pad(mask.segment_ids))
    x = constrain(jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype))
    # remat: keep less than every activation for the backward pass and recompute the rest ("full":
    # training memory drops from O(layers x activations) to O(layers x hidden)).
    policy = layer_scan.remat_policy(remat) if cache is None else "none"
    chunks = (mlp_chunk, layer_chunk)
    args = (positions, inv_freq, mask, cache, cache_index, policy, constrain, chunks)
    run = self._scanned_layers if self.config.scan_layers else self._unrolled_layers
    x, cache = run(x, *args)
    x = self.norm(x[:, :t])
    return x if cache is None else (x, cache)

  def _unrolled_layers(
    self, x, positions, inv_freq, mask, cache, cache_index, policy, constrain, chunks
  ):
    def call(layer, x, positions, inv_freq, mask, cache, cache_index):  # chunks stay static
      return layer(x, positions, inv_freq, mask, cache, cache_index, chunks)

    if policy != "none":
      call = nnx.remat(call, policy=layer_scan.checkpoint_policy(policy))
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = call(
        layer, x, positions, inv_freq, mask, None if cache is None else cache[i], cache_index
      )
      new_cache.append(layer_cache)
      x = constrain(x)
    return x, None if cache is None else new_cache

  def _scanned_layers(
    self, x, positions, inv_freq, mask, cache, cache_index, policy, constrain, chunks
  ):
    """One jax.lax.scan over the stacked layers; a cache (StackedKVCache or a stacked paged
    cache) rides in the carry and each layer updates its own slice in place."""
    if isinstance(cache, list):
      raise ValueError("a scan_layers model takes a stacked cache (CausalLM.init_cache makes one)")
    graphdef, stacked = nnx.split(self.layers)  # every leaf [L, ...]

    def body(carry, per_layer):
      x, cache = carry
      state, i = per_layer
      layer_cache = None if cache is None else cache.replace(layer=i)
      x, layer_cache = nnx.merge(graphdef, state)(
        x, positions, inv_freq, mask, layer_cache, cache_index, chunks
      )
      return (constrain(x), layer_cache), None

    if policy != "none":
      body = jax.checkpoint(body, policy=layer_scan.checkpoint_policy(policy), prevent_cse=False)
    if cache is not None:  # the carry's structure must not change: a layer index from the start
      cache = cache.replace(layer=jnp.int32(0))
    layer_ids = jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32)
    (x, cache), _ = jax.lax.scan(body, (x, cache), (stacked, layer_ids))
    return x, None if cache is None else cache.replace(layer=None)

  def logits(self, hidden):
    """LM-head logits in float32 (log-probs, entropies and KLs are taken in float32)."""
    w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
    return jnp.dot(hidden.astype(self.dtype), w.astype(self.dtype)).astype(jnp.float32)

  def __call__(
    self, input_ids, attention_mask=None, positions=None, *, cache=None, cache_index=None
  ):
    out = self.hidden_states(
      input_ids, attention_mask, positions, cache=cache, cache_index=cache_index
    )
    if cache is None:
      return self.logits(out)
    return self.logits(out[0]), out[1]


def _num_slots(cache) -> int:
  """Key slots S of a dense cache (a per-layer list or a StackedKVCache)."""
  return cache.num_slots if isinstance(cache, layer_scan.StackedKVCache) else cache[0][1].shape[2]


def _no_cache_mask(attention_mask, segment_ids, attention: str):
  """The training/prefill mask: [B, T, T] bool for "dense", else a SegmentMask."""
  impl = attention_ops.resolve(attention)
  segments = attention_mask.astype(jnp.int32) if segment_ids is None else segment_ids
  segments = jnp.where(attention_mask, segments, 0).astype(jnp.int32)  # [B, T]
  if impl != "dense":  # "auto" stays unresolved: the op also looks at the dtype
    return SegmentMask(segments, attention)
  t = attention_mask.shape[-1]
  causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T, T]
  if segment_ids is None:  # exactly the historical mask: causal, over real keys
    return causal[None] & attention_mask[:, None, :]  # [B, T, T]
  same = segments[:, :, None] == segments[:, None, :]
  return causal[None] & same & attention_mask[:, None, :]


def head_weights(model: "CausalLM") -> tuple[jax.Array, str]:
  """The LM head as (weights, layout) for ops.vocab_tiling: [E, V] "ev", or tied [V, E] "ve"."""
  if model.lm_head is None:
    return model.embed_tokens[...], "ve"
  return model.lm_head[...], "ev"


def abstract_model(cfg: ModelConfig, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
  """The model with ShapeDtypeStruct parameters: no memory is allocated."""
  return nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, param_dtype=param_dtype))
