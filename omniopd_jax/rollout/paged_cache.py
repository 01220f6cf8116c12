"""A paged KV cache for decoding: fixed-size pages drawn from one pool as rows grow, and a ragged
decode attention that reads only each row's own pages.

Layout (the one JAX's Pallas paged-attention kernels take): per layer, keys and values are
[KV, num_pages, page_size, D]. A row (a decode slot) owns the pages its `page_table` row lists, in
order; token j of the row lives in page `page_table[row, j // page_size]` at offset
`j % page_size`. Page 0 is the null page: it is never handed out, unused table entries point at it
and finished slots write their (ignored) keys there, so no decode step ever needs a branch.

  pool = PagePool(num_pages=256, page_size=16)
  ids = pool.alloc(3)            # host side: page ids for a row that grew past 32 tokens
  pool.retain(ids[:2])           # a second sample shares the two full prompt pages
  pool.release(ids)              # a row finished; shared pages stay until their last owner goes
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

ATTENTION_IMPLS = ("xla", "pallas_gpu", "pallas_tpu")


class PagePool:
  """Host-side allocator of KV pages with reference counts (pages shared by a prompt's samples)."""

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 2:
      raise ValueError(f"num_pages={num_pages}: need the null page plus at least one more")
    if page_size < 1:
      raise ValueError(f"page_size={page_size} must be >= 1")
    self.num_pages, self.page_size = num_pages, page_size
    self._free = list(range(num_pages - 1, 0, -1))  # a stack; page 0 is the null page
    self._refs = np.zeros(num_pages, np.int32)

  @property
  def num_free(self) -> int:
    return len(self._free)

  def alloc(self, n: int) -> list[int]:
    if n > len(self._free):
      raise MemoryError(
        f"KV page pool exhausted: {n} pages wanted, {len(self._free)} free of "
        f"{self.num_pages - 1}; raise rollout.num_pages or lower rollout.num_slots"
      )
    ids = [self._free.pop() for _ in range(n)]
    self._refs[ids] = 1
    return ids

  def retain(self, ids) -> None:
    for i in ids:
      if self._refs[i] < 1:
        raise ValueError(f"page {i} is not allocated")
      self._refs[i] += 1

  def release(self, ids) -> None:
    for i in ids:
      if self._refs[i] < 1:
        raise ValueError(f"page {i} released more often than allocated")
      self._refs[i] -= 1
      if self._refs[i] == 0:
        self._free.append(i)


def pages_for(num_tokens: int, page_size: int) -> int:
  return -(-int(num_tokens) // page_size)


def init_pages(num_layers, num_kv_heads, head_dim, num_pages, page_size, dtype, stacked=False):
  """An empty page pool per layer: [(k_pages, v_pages)] each [KV, num_pages, page_size, D]; or,
  `stacked` (a scan_layers model), one pair (k_pages, v_pages) [KV, L, num_pages, page_size, D]."""
  if stacked:
    shape = (num_kv_heads, num_layers, num_pages, page_size, head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
  shape = (num_kv_heads, num_pages, page_size, head_dim)
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)]


def ragged_decode_attention(q, k_pages, v_pages, page_table, lengths):
  """Pure-JAX paged decode attention: one query per row over that row's first `lengths` tokens.

  q [S, H, D] (already scaled); k_pages, v_pages [KV, NP, ps, D]; page_table [S, W] int32;
  lengths [S] int32 (tokens to attend, new one included). Returns [S, H, D] in q's dtype. Only
  the W pages each row lists are read (W: the caller's window, >= the longest row's pages).
  The gathered keys stay in their gathered order [KV, S, T, D] and the small query and output
  move instead (putting S first would copy the keys once more per layer and step: 2x slower).
  """
  s, h, d = q.shape
  kv, _, ps, _ = k_pages.shape
  w = page_table.shape[1]
  keys = k_pages[:, page_table].reshape(kv, s, w * ps, d)  # [KV, S, T, D]: own pages only
  values = v_pages[:, page_table].reshape(kv, s, w * ps, d)
  q = q.reshape(s, kv, h // kv, d).swapaxes(0, 1)  # [KV, S, G, D]
  scores = jnp.einsum("ksgd,kstd->ksgt", q, keys).astype(jnp.float32)  # [KV, S, G, T]
  valid = jnp.arange(w * ps)[None, :] < lengths[:, None]  # [S, T]
  # A large finite negative (not -inf): a row with no valid token (a free slot) stays NaN-free.
  scores = jnp.where(valid[None, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # float32 softmax, as transformers
  out = jnp.einsum("ksgt,kstd->ksgd", probs, values)  # [KV, S, G, D]
  return out.swapaxes(0, 1).reshape(s, h, d)


def pallas_decode_attention(q, k_pages, v_pages, page_table, lengths, *, impl, interpret=False):
  """The same attention through the Pallas kernel JAX ships for the backend (`impl`)."""
  w = page_table.shape[1]
  if impl == "pallas_gpu":
    from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged

    k_splits = min(16, w & -w)  # the kernel splits the page window evenly
    return gpu_paged.paged_attention(
      q, k_pages, v_pages, page_table, lengths, block_h=16, k_splits=k_splits,
      pages_per_compute_block=min(8, w // k_splits), interpret=interpret,
    )  # fmt: skip
  if impl == "pallas_tpu":
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged

    call = lambda: tpu_paged(
      q, k_pages, v_pages, lengths, page_table, pages_per_compute_block=min(8, w & -w)
    )
    if interpret:  # the TPU kernel takes no interpret flag: Pallas' TPU interpreter runs it
      with pltpu.force_tpu_interpret_mode():
        return call()
    return call()
  raise ValueError(f"attention impl={impl!r}: supported are {ATTENTION_IMPLS}")


@struct.dataclass
class PagedKVCache:
  """One layer's paged cache as a decode step sees it; `CausalLM` calls `write_and_attend`.

  `lengths` counts the tokens already cached per row: the step's new key goes at that index.
  Rows past their capacity must never reach here (the decode loop stops before they would).

  Stacked (a scan_layers model): the pages of every layer [KV, L, NP, ps, D] ride in the layer
  scan's carry and `layer` says whose; they are read as one [KV, L*NP, ps, D] pool (a free
  reshape) with this layer's page ids offset by layer * NP, so no step copies a layer's pages.
  """

  k_pages: jax.Array  # [KV, NP, ps, D], or stacked [KV, L, NP, ps, D]
  v_pages: jax.Array  # like k_pages
  page_table: jax.Array  # [S, W] int32
  lengths: jax.Array  # [S] int32
  impl: str = struct.field(pytree_node=False, default="xla")
  interpret: bool = struct.field(pytree_node=False, default=False)
  layer: jax.Array | None = None  # int32 scalar: the running layer of a stacked cache

  def write_and_attend(self, q, k, v, scale):
    """q [S, 1, H, D], k/v [S, 1, KV, D] of the step's token -> ([S, 1, H, D], updated cache)."""
    k_pages, v_pages, table = self.k_pages, self.v_pages, self.page_table
    stacked_shape = k_pages.shape if k_pages.ndim == 5 else None
    if stacked_shape is not None:
      if self.layer is None:
        raise ValueError("a stacked paged cache is read inside the layer scan (`layer` unset)")
      kv, n_layers, n_pages, ps, d = stacked_shape
      k_pages = k_pages.reshape(kv, n_layers * n_pages, ps, d)  # [KV, L*NP, ps, D]
      v_pages = v_pages.reshape(kv, n_layers * n_pages, ps, d)
      table = table + self.layer * n_pages  # this layer's pages (its null page: layer * NP)
    ps = k_pages.shape[2]
    page = jnp.take_along_axis(table, (self.lengths // ps)[:, None], axis=1)[:, 0]
    offset = self.lengths % ps  # [S]
    write = lambda pages, new: pages.at[:, page, offset].set(new[:, 0].swapaxes(0, 1))
    k_pages = write(k_pages, k.astype(k_pages.dtype))  # [KV, NP, ps, D]
    v_pages = write(v_pages, v.astype(v_pages.dtype))
    args = ((q[:, 0] * scale).astype(q.dtype), k_pages.astype(q.dtype), v_pages.astype(q.dtype))
    # (the casts are no-ops when the pages hold the compute dtype, as the engine allocates them)
    if self.impl == "xla":
      out = ragged_decode_attention(*args, table, self.lengths + 1)
    else:
      out = pallas_decode_attention(
        *args, table, self.lengths + 1, impl=self.impl, interpret=self.interpret
      )
    if stacked_shape is not None:
      k_pages, v_pages = k_pages.reshape(stacked_shape), v_pages.reshape(stacked_shape)
    return out[:, None], self.replace(k_pages=k_pages, v_pages=v_pages)


def layer_caches(pages, page_table, lengths, impl="xla", interpret=False):
  """The per-layer PagedKVCache list a decode step passes to `CausalLM.hidden_states` (one
  stacked PagedKVCache for stacked pages)."""
  make = functools.partial(PagedKVCache, impl=impl, interpret=interpret)
  if isinstance(pages, tuple):  # stacked (init_pages(..., stacked=True))
    return make(*pages, page_table, lengths)
  return [make(k, v, page_table, lengths) for k, v in pages]


def cache_pages(caches):
  """The pages of `layer_caches`' result after a decode step, as `init_pages` laid them out."""
  if isinstance(caches, PagedKVCache):
    return caches.k_pages, caches.v_pages
  return [(c.k_pages, c.v_pages) for c in caches]


def write_prompt_pages(pages, dense_cache, prompt_len, page_ids):
  """Copy a left-padded dense prefill cache into pages, left-aligned (token 0 at page offset 0).

  pages: per layer (k_pages, v_pages) [KV, NP, ps, D]; dense_cache: per layer (k [A, KV, D, P],
  v [A, KV, P, D]) as `CausalLM.init_cache` lays them out; prompt_len [A] int32; page_ids
  [A, NPP] int32, the pages of each prompt row (0 where a row needs fewer). A row's samples may
  list the same full pages: they receive identical values. Stacked pages (k_pages, v_pages)
  [KV, L, NP, ps, D] take a models.layer_scan.StackedKVCache (k [L, A, KV, D, P]), every layer at once.
  """
  a, npp = page_ids.shape
  stacked = isinstance(pages, tuple)
  ps = pages[0].shape[3] if stacked else pages[0][0].shape[2]
  p = dense_cache.num_slots if stacked else dense_cache[0][1].shape[2]

  src = (p - prompt_len)[:, None] + jnp.arange(npp * ps)[None, :]  # [A, T] dense slot of token t
  src = jnp.minimum(src, p - 1)  # past the prompt: any slot (masked out until overwritten)

  def one_layer(k_pages, v_pages, k, v):
    k_tok = jnp.take_along_axis(k, src[:, None, None, :], axis=3).swapaxes(2, 3)  # [A, KV, T, D]
    v_tok = jnp.take_along_axis(v, src[:, None, :, None], axis=2)  # [A, KV, T, D]
    return _write_blocks(k_pages, k_tok, page_ids), _write_blocks(v_pages, v_tok, page_ids)

  if stacked:  # pages' layer axis is 1, the dense cache's 0
    return jax.vmap(one_layer, in_axes=(1, 1, 0, 0), out_axes=1)(
      *pages, dense_cache.k, dense_cache.v
    )
  return [
    one_layer(*layer_pages, *layer_dense) for layer_pages, layer_dense in zip(pages, dense_cache)
  ]


def _write_blocks(pool, tokens, page_ids):
  """tokens [A, KV, NPP*ps, D] into the pages page_ids [A, NPP] of pool [KV, NP, ps, D]."""
  a, kv, _, d = tokens.shape
  npp = page_ids.shape[1]
  ps = pool.shape[2]
  blocks = tokens.reshape(a, kv, npp, ps, d).astype(pool.dtype)
  return pool.at[:, page_ids].set(blocks.swapaxes(0, 1))  # [KV, A, NPP, ps, D]
