"""Continuous batching over a paged KV cache: a fixed number of decode slots; when a row ends (EOS
or its own length cap) its slot takes the next waiting prompt, without recompiling.

The host runs the schedule, the device runs two jitted programs:
  prefill(...)  a batch of waiting prompts: one dense prefill per prompt, its K/V copied into
                pages (a prompt's K samples share its full pages), first tokens sampled, slots set;
  decode(...)   up to `steps_per_sync` decode steps over every slot, stopping early once enough
                slots are free for the next prompt; attention reads only each row's own pages.
Between calls the host frees the pages of finished rows, grows live rows' page lists by at most
one call's worth of tokens, and admits prompts (longest length cap first, so the long rows start
early and the short ones fill in around them). Programs compile once per prompt bucket, admitted
batch bucket and page-window bucket (a power of two), never per call.

Sampling (token, log-prob, entropy; per-row keys) is the caller's `sample_fn`, so this module and
the static sampler share one definition of a sample.

Under a mesh (one process): the slots are split over the batch axes, so each device decodes its
own slots with the weights in their decode layout; the page pool and the outputs are replicated
(`Engine._buffer_shardings`: every page gather stays local, and a step moves only the new keys
and values of each layer). A replicated pool costs its full size on every device: a pool sharded
with the slots (per-device page ranges read through shard_map) is what a large pod needs.
"""

import dataclasses
from collections import deque
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from omniopd_jax import sharding
from omniopd_jax.rollout import paged_cache

# Admitted prompts per prefill call round up to one of these (then to multiples of the largest).
ADMIT_BUCKETS = (1, 4, 16, 64, 256, 1024)
# Decode attends over a window of W pages per slot, W a power of two at least this (fewer W, fewer
# programs; a short window costs little next to the weights every step reads).
MIN_WINDOW_PAGES = 8


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  """Static engine settings (each distinct value compiles its own programs)."""

  num_slots: int = 0  # rows decoded at once; 0: one slot per row of the call
  page_size: int = 16  # tokens per KV page
  num_pages: int = 0  # pages in the pool, null page included; 0: every slot at its cap
  steps_per_sync: int = 32  # decode steps per device call at most (slots refill between calls)
  attention: str = "xla"  # xla | pallas_gpu | pallas_tpu (see paged_cache.ATTENTION_IMPLS)
  interpret: bool = False  # run a Pallas kernel in interpret mode (CPU tests)

  @classmethod
  def from_config(cls, rollout) -> "EngineOptions":
    """From the `config.rollout` fields of the same names (configs/math.py)."""
    names = ("num_slots", "page_size", "num_pages", "steps_per_sync", "attention")
    return cls(**{name: rollout[name] for name in names if name in rollout})

  def __post_init__(self):
    if self.num_slots < 0 or self.page_size < 1 or self.steps_per_sync < 1:
      raise ValueError(f"need num_slots >= 0, page_size >= 1, steps_per_sync >= 1: {self}")
    if self.attention not in paged_cache.ATTENTION_IMPLS:
      raise ValueError(f"attention={self.attention!r}: one of {paged_cache.ATTENTION_IMPLS}")


def rows_per_shard_multiple(mesh, rules=sharding.DEFAULT_RULES) -> int:
  """The product of the mesh axes rows (slots) are split over: slot counts are multiples of it."""
  target = dict(rules).get("batch")
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  return int(np.prod([mesh.shape[a] for a in axes]))


# Under a mesh the continuous engine keeps its page pool on every device; it runs only while the
# pool takes at most this share of one device's memory (else the static engine, rows sharded).
POOL_SHARE = 0.25
_POOL_WARNED: set = set()


def replicated_pool_fits(cfg, dtype, engine_options, n_rows: int, row_len: int) -> bool:
  """Whether the continuous engine's page pool, replicated on every device of a mesh, fits in
  POOL_SHARE of a device's memory (backends that do not report memory, e.g. CPU: always)."""
  eopts = engine_options or EngineOptions()
  page = eopts.page_size
  pages = eopts.num_pages or (eopts.num_slots or n_rows) * -(-row_len // page) + 1
  per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.dim_per_head
  pool = pages * page * per_token * jnp.dtype(dtype).itemsize
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  if not limit or pool <= POOL_SHARE * limit:
    return True
  if pool not in _POOL_WARNED:
    _POOL_WARNED.add(pool)
    print(
      f"rollout: the continuous engine's page pool ({pool / 2**30:.1f} GiB, replicated on every "
      f"device under a mesh) exceeds {POOL_SHARE:.0%} of a device's {limit / 2**30:.1f} GiB; "
      "decoding with the static engine (rows sharded). Lower rollout.num_slots / num_pages to "
      "keep continuous batching.",
      flush=True,
    )
  return False


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


class Engine:
  """The jitted prefill/decode programs for one (graphdef, sampling options, engine options).

  `sample_fn(logits [S, V] float32, row_keys [S], steps [S]) -> (token, logprob, entropy)` and
  `head_fn(model) -> [E, V]` come from the sampler. `run(...)` decodes one call's prompts.
  """

  def __init__(self, graphdef, sampling, options: EngineOptions, sample_fn, head_fn, mesh=None,
               rules=sharding.DEFAULT_RULES):  # fmt: skip
    self.graphdef, self.sampling, self.options = graphdef, sampling, options
    self.sample_fn, self.head_fn = sample_fn, head_fn
    self.mesh, self.rules = mesh, tuple(rules)
    self.num_traces = 0
    self.last_stats = {}  # calls and decode steps of the last `run`
    if mesh is None:
      self._prefill = jax.jit(self._prefill_program, donate_argnums=(1, 2, 3))
      self._decode = jax.jit(self._decode_program, donate_argnums=(1, 2, 3))
      return
    if options.attention != "xla" and mesh.size > 1 and not options.interpret:
      # GSPMD cannot split a Pallas custom call, and the paged kernels are not yet run per shard.
      raise ValueError(
        f"rollout.attention={options.attention!r} under a {mesh.size}-device mesh: the paged "
        "Pallas kernels run on one device's slots only; use rollout.attention=xla"
      )
    if options.num_slots % rows_per_shard_multiple(mesh, self.rules):
      raise ValueError(
        f"num_slots={options.num_slots} must be a multiple of the batch axes' size "
        f"{rows_per_shard_multiple(mesh, self.rules)} under this mesh"
      )
    # Under a mesh: slots split over the batch axes (each device decodes its own slots); pages
    # and outputs replicated (see `place`). Fixed output shardings: the donated buffers come
    # back laid out as they went in, so no call ever sees a new input layout (no recompile).
    pages, slots, out = self._buffer_shardings()
    scalar = NamedSharding(mesh, P())
    self._prefill = jax.jit(
      self._prefill_program, donate_argnums=(1, 2, 3), out_shardings=(pages, slots, out)
    )
    self._decode = jax.jit(
      self._decode_program, donate_argnums=(1, 2, 3), out_shardings=(pages, slots, out, scalar)
    )

  def _buffer_shardings(self):
    """(pages, slots, out) shardings, each a prefix of its tree: pages replicated (a slot's pages
    are anywhere in the pool, and a prompt's K samples share theirs: a replicated pool keeps
    every page gather local; each step all-gathers only the new [S, KV, D] keys and values);
    slot state [S] over the batch axes; outputs [R, L] replicated (rows land in any slot)."""
    replicated = NamedSharding(self.mesh, P())
    return replicated, sharding.batch_sharding(self.mesh, 1, self.rules), replicated

  def place(self, pages, slots, out):
    """Buffers laid out for this engine (unchanged without a mesh)."""
    if self.mesh is None:
      return pages, slots, out
    return jax.device_put((pages, slots, out), self._buffer_shardings())

  def _rows_constraint(self):
    """The residual stream [S, 1, E] kept split by slot (None without a mesh)."""
    if self.mesh is None:
      return None
    rows = sharding.batch_sharding(self.mesh, 3, self.rules)
    return lambda x: jax.lax.with_sharding_constraint(x, rows)

  # ---- device programs -------------------------------------------------------------------------

  def _emit(self, out, logits, keys, steps, rows, live):
    """Sample each slot's next token and record it in its row of `out` (rows past R: dropped)."""
    token, logprob, entropy = self.sample_fn(logits, keys, steps)  # [S] each
    rows = jnp.where(live, rows, out["tokens"].shape[0])  # a dead slot writes nowhere
    out = {
      "tokens": out["tokens"].at[rows, steps].set(token, mode="drop"),
      "logprobs": out["logprobs"].at[rows, steps].set(logprob, mode="drop"),
      "entropy": out["entropy"].at[rows, steps].set(entropy, mode="drop"),
    }
    eos = jnp.asarray(self.sampling.eos_ids or (-1,), jnp.int32)
    return token, out, jnp.isin(token, eos)

  def _prefill_program(self, state, pages, slots, out, prompt, page_ids, slot_ids, row_ids, caps):
    """prompt: tokens/mask [A, P]; page_ids [A*K, NPP]; slot_ids/row_ids/caps [A*K] (padding
    entries carry slot S and row R, so their writes are dropped)."""
    self.num_traces += 1
    model = nnx.merge(self.graphdef, state)
    k_samples = self.sampling.num_samples
    tokens, mask = prompt["tokens"], prompt["mask"].astype(bool)
    a, p = tokens.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [A, P]
    hidden, dense = model.hidden_states(
      tokens, mask, positions, cache=model.init_cache(a, p), cache_index=0
    )
    logits = jnp.repeat(model.logits(hidden[:, -1]), k_samples, axis=0)  # [A*K, V]
    prompt_len = jnp.repeat(mask.sum(axis=1).astype(jnp.int32), k_samples)  # [A*K]
    # Rows: axis 0 of a layer's [A, KV, ...], axis 1 of a scan_layers StackedKVCache's [L, A, ...].
    dense = jax.tree.map(lambda x: jnp.repeat(x, k_samples, axis=x.ndim - 4), dense)
    pages = paged_cache.write_prompt_pages(pages, dense, prompt_len, page_ids)
    n_rows = out["tokens"].shape[0]
    new_keys = prompt["row_keys"][jnp.minimum(row_ids, n_rows - 1)]  # [A*K]
    keys = slots["key"].at[slot_ids].set(new_keys, mode="drop")
    zero = jnp.zeros_like(row_ids)
    token, out, ends = self._emit(out, logits, new_keys, zero, row_ids, row_ids < n_rows)
    live = ~ends & (caps > 1)
    set_ = lambda name, x: slots[name].at[slot_ids].set(x, mode="drop")
    slots = dict(
      key=keys, token=set_("token", token), length=set_("length", prompt_len),
      step=set_("step", zero + 1), cap=set_("cap", caps), live=set_("live", live),
      row=set_("row", row_ids),
    )  # fmt: skip
    return pages, slots, out

  def _decode_program(self, state, pages, slots, out, page_table, capacity, max_steps, min_free):
    """Up to `max_steps` decode steps. page_table [S, W]; capacity [S] tokens each slot's pages
    hold. Stops early when every slot ended, when `min_free` slots are free, or before a live
    row would outgrow its pages."""
    self.num_traces += 1
    model = nnx.merge(self.graphdef, state)
    head = self.head_fn(model)  # [E, V]
    n_slots = page_table.shape[0]
    opts = self.options

    def cond(carry):
      i, _, slots, _ = carry
      live = slots["live"]
      room = jnp.all(~live | (slots["length"] < capacity))
      return (i < max_steps) & jnp.any(live) & (n_slots - live.sum() < min_free) & room

    def body(carry):
      i, pages, slots, out = carry
      live = slots["live"]
      # A finished slot writes its (ignored) key into the null page, never into pages it shared.
      table = jnp.where(live[:, None], page_table, 0)
      lengths = jnp.where(live, slots["length"], 0)
      caches = paged_cache.layer_caches(pages, table, lengths, opts.attention, opts.interpret)
      hidden, caches = model.hidden_states(
        slots["token"][:, None], jnp.ones((n_slots, 1), bool), slots["length"][:, None],
        cache=caches, cache_index=0, constrain=self._rows_constraint(),
      )  # fmt: skip
      pages = paged_cache.cache_pages(caches)
      logits = jnp.dot(hidden[:, 0].astype(model.dtype), head).astype(jnp.float32)  # [S, V]
      token, out, ends = self._emit(out, logits, slots["key"], slots["step"], slots["row"], live)
      step = slots["step"] + live
      slots = dict(
        slots, token=jnp.where(live, token, slots["token"]), length=slots["length"] + live,
        step=step, live=live & ~ends & (step < slots["cap"]),
      )  # fmt: skip
      return i + 1, pages, slots, out

    steps, pages, slots, out = jax.lax.while_loop(cond, body, (jnp.int32(0), pages, slots, out))
    return pages, slots, out, steps

  # ---- host schedule ---------------------------------------------------------------------------

  def init_buffers(self, state, n_rows, max_pages):
    """Empty pages, slot state and outputs on the device."""
    model, opts, smp = nnx.merge(self.graphdef, state), self.options, self.sampling
    cfg, dtype = model.config, model.dtype
    s, length = opts.num_slots, smp.max_new_tokens
    num_pages = opts.num_pages or s * max_pages + 1
    pages = paged_cache.init_pages(
      cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dim_per_head, num_pages,
      opts.page_size, dtype, stacked=cfg.scan_layers,
    )  # fmt: skip
    zeros = lambda dt: jnp.zeros((s,), dt)
    slots = dict(
      key=jax.random.split(jax.random.key(0), s), token=zeros(jnp.int32),
      length=zeros(jnp.int32), step=zeros(jnp.int32), cap=zeros(jnp.int32),
      live=zeros(bool), row=jnp.full((s,), n_rows, jnp.int32),
    )  # fmt: skip
    out = {
      "tokens": jnp.full((n_rows, length), smp.pad_id, jnp.int32),
      "logprobs": jnp.zeros((n_rows, length), jnp.float32),
      "entropy": jnp.zeros((n_rows, length), jnp.float32),
    }
    return pages, slots, out, num_pages

  def run(self, state, prompt_tokens, prompt_mask, keys, caps, on_row_done=None):
    """Decode every prompt. prompt_tokens/mask [B, P] (left-padded; all-padding rows skipped),
    keys [B*K] row keys, caps [B*K] per-row length caps. Returns (out dict of device arrays
    [B*K, L], emitted [B*K] tokens per row)."""
    return _Schedule(self, state, prompt_tokens, prompt_mask, keys, caps, on_row_done).run()


class _Schedule:
  """One call's host-side state: the page pool, slot tables and the queue of waiting prompts."""

  def __init__(self, engine, state, prompt_tokens, prompt_mask, keys, caps, on_row_done):
    self.engine, self.state, self.on_row_done = engine, state, on_row_done
    opts, smp = engine.options, engine.sampling
    self.k, self.ps, self.s = smp.num_samples, opts.page_size, opts.num_slots
    if self.s < self.k:
      raise ValueError(
        f"num_slots={self.s} < num_samples={self.k}: a prompt's samples start together"
      )
    self.prompt_tokens, self.prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask, bool)
    b, p = self.prompt_tokens.shape
    self.caps = np.asarray(caps, np.int32)
    self.prompt_len = self.prompt_mask.sum(axis=1)
    self.max_pages = _next_pow2(paged_cache.pages_for(p + smp.max_new_tokens, self.ps))
    self.pages, self.slots, self.out, num_pages = engine.init_buffers(
      state, b * self.k, self.max_pages
    )
    self.pages, self.slots, self.out = engine.place(self.pages, self.slots, self.out)
    self.pool = paged_cache.PagePool(num_pages, self.ps)
    self.table = np.zeros((self.s, self.max_pages), np.int32)  # [S, W_max] page ids
    self.owned = [[] for _ in range(self.s)]  # pages each slot holds a reference to
    self.slot_row = np.full(self.s, -1)
    self.length = np.zeros(self.s, np.int64)  # cached tokens per slot, as of the last sync
    self.emitted = np.zeros(b * self.k, np.int32)
    self.device_keys = keys
    self.stats = {"prefill_calls": 0, "decode_calls": 0, "decode_steps": 0}
    self._steps = []  # decode steps per call, as device scalars (read once at the end)
    real = [i for i in range(b) if self.prompt_len[i] > 0]
    longest_first = sorted(real, key=lambda i: -int(self.caps[i * self.k : (i + 1) * self.k].max()))
    self.waiting = deque(longest_first)

  def run(self):
    while self.waiting or (self.slot_row >= 0).any():
      self._admit()
      self._decode()
    self.stats["decode_steps"] = int(sum(jax.device_get(self._steps)))
    self.engine.last_stats = self.stats
    return self.out, self.emitted

  def _free_slots(self):
    return [int(i) for i in np.flatnonzero(self.slot_row < 0)]

  def _pages_needed(self, i) -> int:
    """Pages prompt i's group may take by its first sync: the shared full prompt pages, plus per
    sample its partial page and one sync's growth (never past what its cap allows)."""
    n = int(self.prompt_len[i])
    cap = int(self.caps[i * self.k : (i + 1) * self.k].max())
    full = n // self.ps
    last = min(n + self.engine.options.steps_per_sync, n + cap - 1)  # tokens cached at most
    return full + self.k * (max(paged_cache.pages_for(last, self.ps), full + 1) - full)

  def _admit(self):
    free = self._free_slots()
    group = []
    while self.waiting and len(free) >= self.k:
      i = self.waiting[0]
      if self._pages_needed(i) > self.pool.num_free:
        break
      self.waiting.popleft()
      group.append((i, free[: self.k]))
      free = free[self.k :]
    if not group:
      if self.waiting and not (self.slot_row >= 0).any():  # nothing will free a page
        need = self._pages_needed(self.waiting[0])
        raise MemoryError(
          f"KV page pool too small: a prompt group needs {need} pages, the pool has "
          f"{self.pool.num_pages - 1}; raise rollout.num_pages or lower rollout.steps_per_sync"
        )
      return
    p = self.prompt_tokens.shape[1]
    npp = paged_cache.pages_for(p, self.ps)
    # The bucket above the group, but never more rows than the slots could take at once.
    a = min(next(x for x in ADMIT_BUCKETS + (len(group),) if x >= len(group)), self.s // self.k)
    n_rows = len(self.emitted)
    tokens = np.zeros((a, p), np.int32)
    mask = np.zeros((a, p), bool)
    page_ids = np.zeros((a * self.k, npp), np.int32)
    slot_ids = np.full(a * self.k, self.s, np.int32)
    row_ids = np.full(a * self.k, n_rows, np.int32)
    caps = np.zeros(a * self.k, np.int32)
    for j, (i, slots) in enumerate(group):
      tokens[j], mask[j] = self.prompt_tokens[i], self.prompt_mask[i]
      full, partial = divmod(int(self.prompt_len[i]), self.ps)
      shared = self.pool.alloc(full)
      for k, slot in enumerate(slots):
        if k:
          self.pool.retain(shared)
        own = shared + self.pool.alloc(int(bool(partial)))
        r = j * self.k + k
        page_ids[r, : len(own)] = own
        slot_ids[r], row_ids[r] = slot, i * self.k + k
        caps[r] = self.caps[i * self.k + k]
        self.table[slot] = 0
        self.table[slot, : len(own)] = own
        self.owned[slot] = list(own)
        self.slot_row[slot] = i * self.k + k
        self.length[slot] = self.prompt_len[i]
    prompt = {"tokens": tokens, "mask": mask, "row_keys": self.device_keys}
    self.stats["prefill_calls"] += 1
    self.pages, self.slots, self.out = self.engine._prefill(
      self.state, self.pages, self.slots, self.out, prompt, page_ids, slot_ids, row_ids, caps
    )  # rows that their first token ended (EOS, cap 1) are noticed at the next sync

  def _grow(self):
    """Give every live slot pages for one more call's tokens; returns capacity [S] in tokens."""
    steps = self.engine.options.steps_per_sync
    for slot in np.flatnonzero(self.slot_row >= 0):
      row = self.slot_row[slot]
      last = self.prompt_len[row // self.k] + self.caps[row] - 1  # the last token ever cached
      want = paged_cache.pages_for(min(self.length[slot] + steps, last), self.ps)
      have = len(self.owned[slot])
      if want > have:
        new = self.pool.alloc(want - have)
        self.table[slot, have:want] = new
        self.owned[slot].extend(new)
    return np.array([len(o) * self.ps for o in self.owned], np.int32)

  def _decode(self):
    if not (self.slot_row >= 0).any():
      return
    capacity = self._grow()
    window = min(self.max_pages, _next_pow2(max(MIN_WINDOW_PAGES, *map(len, self.owned))))
    can_admit = self.waiting and self._pages_needed(self.waiting[0]) <= (self.pool.num_free)
    min_free = self.k if can_admit else self.s + 1
    self.stats["decode_calls"] += 1
    self.pages, self.slots, self.out, steps = self.engine._decode(
      self.state, self.pages, self.slots, self.out, self.table[:, :window], capacity,
      np.int32(self.engine.options.steps_per_sync), np.int32(min_free),
    )  # fmt: skip
    self._steps.append(steps)
    self._sync()

  def _sync(self):
    """Read the slots back; release the pages of rows that ended and report them."""
    live, length, step = jax.device_get(
      (self.slots["live"], self.slots["length"], self.slots["step"])
    )
    self.length[:] = length
    ended = [int(s) for s in np.flatnonzero((self.slot_row >= 0) & ~live)]
    rows = [int(self.slot_row[slot]) for slot in ended]
    for slot, row in zip(ended, rows):
      self.emitted[row] = step[slot]
      self.pool.release(self.owned[slot])
      self.owned[slot], self.slot_row[slot] = [], -1
      self.table[slot] = 0
    if self.on_row_done is not None and rows:
      index = np.zeros(self.s, np.int32)  # always S rows: one program whatever rows ended
      index[: len(rows)] = rows
      got = jax.device_get(_take_rows(self.out, index))
      for j, row in enumerate(rows):
        n = int(self.emitted[row])
        self.on_row_done(row, *(got[k][j, :n] for k in ("tokens", "logprobs", "entropy")))


Callback = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]
# out [R, L] arrays, index [S] -> those rows [S, L] (one compiled gather, not one per row count).
_take_rows = jax.jit(lambda out, index: {name: x[index] for name, x in out.items()})
