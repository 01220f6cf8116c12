"""Rollouts: prefill plus KV-cache decode in one jitted program, returning each sampled token with
its log-prob and the full-vocabulary entropy of the raw (temperature 1) distribution, in float32.

  rollout = sampler.generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=64, eos_ids=[2])
  rollout.tokens, rollout.mask, rollout.logprobs, rollout.entropy  # numpy, each [B, 64]
"""

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from omniopd_jax import sharding
from omniopd_jax.models import layer_scan
from omniopd_jax.models import lm as model_lib
from omniopd_jax.rollout import continuous, decode_sharding, forks
from omniopd_jax.rollout import rows as row_identity

# Prompt lengths and batch sizes are rounded up to one of these (then to multiples of the largest),
# so a training run compiles a handful of programs; the padding wasted is at most a third.
PROMPT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)

_num_traces = 0


class Rollout(NamedTuple):
  """Sampled continuations; position j of row b is the j-th generated token of prompt b."""

  tokens: np.ndarray  # [B, L] int32; pad_id after the row finished
  mask: np.ndarray  # [B, L] bool; generated tokens up to and including the first EOS
  logprobs: np.ndarray  # [B, L] float32; log p(token) under the temperature-1 distribution
  entropy: np.ndarray  # [B, L] float32; full-vocabulary entropy of that distribution


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """Static sampling settings: each distinct value compiles its own program."""

  max_new_tokens: int
  temperature: float = 1.0  # 0 = greedy
  top_p: float = 1.0  # nucleus: keep the smallest set of tokens with mass >= top_p
  top_k: int = 0  # 0 = no top-k filter
  eos_ids: tuple[int, ...] = ()  # a row stops after emitting any of these; () = never stop
  pad_id: int = 0  # written after a row finished
  num_samples: int = 1  # continuations per prompt (rows b*K .. b*K+K-1 continue prompt b)

  def __post_init__(self):
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 disables nucleus sampling)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables top-k)")
    if self.num_samples < 1:
      raise ValueError(f"num_samples={self.num_samples} must be >= 1")


def num_traces() -> int:
  """How many times a generate program has been traced (each trace is a compilation)."""
  return _num_traces + sum(engine.num_traces for engine in _ENGINES.values())


def bucket(n: int, buckets: Sequence[int], multiple: int = 1) -> int:
  """The smallest bucket >= n (past the last one: a multiple of it), rounded up to `multiple`."""
  size = next((b for b in buckets if b >= n), -(-n // buckets[-1]) * buckets[-1])
  return -(-size // multiple) * multiple


def pad_prompts(
  prompts: Sequence[Sequence[int]],
  *,
  batch_size: int | None = None,
  prompt_len: int | None = None,
  pad_id: int = 0,
  batch_multiple: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token-id lists into bucketed arrays: (tokens [B', P] int32, mask [B', P] bool).

  B' and P default to the buckets above n_prompts and the longest prompt. Rows past the prompts
  are all-padding (mask all False): the sampler treats them as finished from the start.
  """
  if len(prompts) == 0:
    raise ValueError("prompts is empty: pass a list of token-id lists")
  lengths = [len(p) for p in prompts]
  if min(lengths) == 0:
    raise ValueError(f"prompt {lengths.index(0)} is empty: every prompt needs >= 1 token (BOS)")
  b = batch_size or bucket(len(prompts), BATCH_BUCKETS, batch_multiple)
  p = prompt_len or bucket(max(lengths), PROMPT_BUCKETS)
  if b < len(prompts) or b % batch_multiple or p < max(lengths):
    raise ValueError(
      f"batch_size={b} / prompt_len={p} cannot hold {len(prompts)} prompts of up to "
      f"{max(lengths)} tokens (batch_size must also be a multiple of {batch_multiple})"
    )
  tokens = np.full((b, p), pad_id, np.int32)
  mask = np.zeros((b, p), bool)
  for i, ids in enumerate(prompts):
    tokens[i, p - len(ids) :] = np.asarray(ids, np.int32)
    mask[i, p - len(ids) :] = True
  return tokens, mask


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
  """Set logits outside the top-k and outside the top-p nucleus to -inf. logits: [B, V] float32."""
  neg_inf = jnp.float32(-jnp.inf)
  top_k = top_k if 0 < top_k < logits.shape[-1] else 0
  if top_k:
    top = jax.lax.top_k(logits, top_k)[0]  # [B, k], descending
    logits = jnp.where(logits < top[:, -1:], neg_inf, logits)
  if top_p < 1.0:
    # The nucleus lies inside the top-k when there is one, so sorting k values suffices.
    ordered = top if top_k else -jnp.sort(-logits, axis=-1)  # [B, k|V], descending
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, k|V]
    keep = mass_before < top_p  # the top token always stays
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    logits = jnp.where(logits < threshold, neg_inf, logits)
  return logits


def sample_tokens(logits, keys, options: SamplingOptions):
  """Next tokens [B] int32 from float32 logits [B, V], one PRNG key per row (keys [B])."""
  if options.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = filter_logits(logits / options.temperature, options.top_k, options.top_p)
  draw = lambda key, row: jax.random.categorical(key, row, axis=-1)
  return jax.vmap(draw)(keys, scaled).astype(jnp.int32)


def sample_step(logits, row_keys, steps, options: SamplingOptions):
  """Token [N], its log-prob [N] and entropy [N] at generated index `steps` [N] of each row.

  The draw uses `fold_in(row_key, step)`: a row's sample is a function of its own key and index
  only, whatever slot, batch or process decodes it.
  """
  keys = jax.vmap(jax.random.fold_in)(row_keys, steps)
  token = sample_tokens(logits, keys, options)  # [N]
  logprob, entropy = forks.logprob_and_entropy(logits, token)  # [N], [N]
  return token, logprob, entropy


def _lm_head(model):
  """The LM-head matrix [E, V] in the compute dtype, laid out for `hidden @ head`.

  A tied head is the embedding transposed. The barrier makes XLA materialise that transpose once,
  before the decode loop; otherwise it folds it into every step's matmul, which then reads the
  [V, E] table across its rows (about 20% slower on CPU for SmolLM2's 49152 x 576 table).
  """
  if model.lm_head is not None:
    return model.lm_head[...].astype(model.dtype)
  return jax.lax.optimization_barrier(model.embed_tokens[...].astype(model.dtype).T)


def _cache_shardings(model, mesh, rules):
  cfg = model.config
  kv, d = cfg.num_key_value_heads, cfg.dim_per_head
  spec = lambda axes, shape: sharding.logical_to_spec(axes, shape, mesh, rules)
  return (
    NamedSharding(mesh, spec(model_lib.K_CACHE_AXES, (1, kv, d, 1))),
    NamedSharding(mesh, spec(model_lib.V_CACHE_AXES, (1, kv, 1, d))),
  )


def make_generate_fn(
  graphdef, options: SamplingOptions, *, mesh=None, rules=sharding.DEFAULT_RULES, state=None
):
  """A jitted `fn(state, prompt_tokens, prompt_mask, seed) -> dict` for a train loop to hold.

  Args:
    graphdef: `nnx.split(model)[0]`; the parameters come in as `state` at each call, so new
      parameter values never recompile.
    options: static sampling settings.
    mesh: optional; then rows are split over the batch axes and, when `state` (an example state
      or its abstract shape) is given, parameters are pinned to their logical-axis shardings.

  The function takes prompt_tokens [B, P] int32 (left-padded, e.g. from `pad_prompts`),
  prompt_mask [B, P] bool and a seed (an int, or [B] per-prompt seeds), and returns device
  arrays tokens/mask/logprobs/entropy [B*K, L] plus
  `steps` (decode iterations run; the loop exits once every row has emitted an EOS). It compiles
  once per (B, P) and never again.
  """
  opts = options
  eos = jnp.asarray(opts.eos_ids or (-1,), jnp.int32)
  length, k_samples = opts.max_new_tokens, opts.num_samples

  def run(state, prompt_tokens, prompt_mask, seed, caps):
    global _num_traces
    _num_traces += 1
    model = nnx.merge(graphdef, state)
    b, p = prompt_tokens.shape
    prompt_mask = prompt_mask.astype(bool)
    constrain = lambda x, s: x if mesh is None else jax.lax.with_sharding_constraint(x, s)
    rows = None if mesh is None else sharding.batch_sharding(mesh, 2, rules)
    k_sh, v_sh = (None, None) if mesh is None else _cache_shardings(model, mesh, rules)

    # Prefill: write the prompt into the cache; logits only at the last slot (every row's last
    # prompt token sits there, prompts being left-padded), not over the whole prompt.
    pin = lambda k, v: (constrain(k, k_sh), constrain(v, v_sh))  # one layer's [B, KV, ...]
    cache = layer_scan.map_cache(model.init_cache(b, p + length), pin)
    slot_mask = jnp.concatenate([prompt_mask, jnp.ones((b, length), bool)], axis=1)  # [B, S]
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)  # [B, P]
    hidden, cache = model.hidden_states(
      prompt_tokens, slot_mask, positions, cache=cache, cache_index=0
    )
    logits = model.logits(hidden[:, -1])  # [B, V]
    prompt_len = prompt_mask.sum(axis=1).astype(jnp.int32)  # [B]
    done = ~prompt_mask.any(axis=1)  # all-padding rows are finished from the start
    if k_samples > 1:  # K continuations share one prefill
      rep = lambda x: jnp.repeat(x, k_samples, axis=0)
      cache = layer_scan.map_cache(cache, lambda k, v: pin(rep(k), rep(v)))
      logits, slot_mask, prompt_len, done = map(rep, (logits, slot_mask, prompt_len, done))
    n = b * k_samples
    keys = row_identity.row_keys(seed, prompt_tokens, prompt_mask, k_samples)  # [N]
    head = _lm_head(model)  # [E, V]

    def logits_fn(hidden):  # [N, E] -> [N, V] float32, as model.logits
      return jnp.dot(hidden.astype(model.dtype), head).astype(jnp.float32)

    def emit(step, logits, done, out):
      token, logprob, entropy = sample_step(logits, keys, jnp.full((n,), step), opts)  # [N]
      live = ~done
      out = {
        "tokens": out["tokens"].at[:, step].set(jnp.where(live, token, opts.pad_id)),
        "mask": out["mask"].at[:, step].set(live),
        "logprobs": out["logprobs"].at[:, step].set(jnp.where(live, logprob, 0.0)),
        "entropy": out["entropy"].at[:, step].set(jnp.where(live, entropy, 0.0)),
      }
      ends = jnp.isin(token, eos) | (step + 1 >= caps)  # EOS, or the row's own length cap
      return token, done | (live & ends), out

    out = {
      "tokens": jnp.full((n, length), opts.pad_id, jnp.int32),
      "mask": jnp.zeros((n, length), bool),
      "logprobs": jnp.zeros((n, length), jnp.float32),
      "entropy": jnp.zeros((n, length), jnp.float32),
    }
    out = {name: constrain(x, rows) for name, x in out.items()}
    token, done, out = emit(0, logits, done, out)

    def cond(carry):
      step, _, done, _, _ = carry
      return (step < length) & ~jnp.all(done)

    def body(carry):
      # Step i feeds token i-1 (slot P+i-1, position prompt_len+i-1) and samples token i.
      step, token, done, cache, out = carry
      hidden, cache = model.hidden_states(
        token[:, None],
        slot_mask,
        (prompt_len + step - 1)[:, None],
        cache=cache,
        cache_index=p + step - 1,
      )
      token, done, out = emit(step, logits_fn(hidden[:, 0]), done, out)
      return step + 1, token, done, cache, out

    steps, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), token, done, cache, out))
    return dict(out, steps=steps)

  if mesh is None:
    jitted = jax.jit(run)
  else:
    rows = sharding.batch_sharding(mesh, 2, rules)
    scalar = NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh = None if state is None else sharding.variable_shardings(state, mesh, rules)
    out_sh = dict(tokens=rows, mask=rows, logprobs=rows, entropy=rows, steps=scalar)
    in_sh = (state_sh, rows, rows, scalar, sharding.batch_sharding(mesh, 1, rules))
    jitted = jax.jit(run, in_shardings=in_sh, out_shardings=out_sh)

  def generate_fn(state, prompt_tokens, prompt_mask, seed, caps=None):
    # Fixed dtypes, so an int64 numpy array or a Python int seed never makes a second program.
    if isinstance(prompt_tokens, np.ndarray):
      prompt_tokens, prompt_mask = prompt_tokens.astype(np.int32), prompt_mask.astype(bool)
    if caps is None:  # every row may run to max_new_tokens
      caps = np.full(prompt_tokens.shape[0] * k_samples, length, np.int32)
    seed = row_identity.seed_array(seed, prompt_tokens.shape[0])
    return jitted(state, prompt_tokens, prompt_mask, seed, caps)

  generate_fn.jitted = jitted  # for .lower() / cost analysis
  return generate_fn


# (graphdef, options, mesh, rules) -> jitted fn; jax.jit then caches one program per input shape.
_GENERATE_FNS: dict = {}
# (graphdef, options, engine options) -> continuous.Engine (its jits cache one program per shape).
_ENGINES: dict = {}
ENGINES = ("continuous", "static")
_LAST_STATS: dict = {}


def last_stats() -> dict:
  """Engine, slots, decode steps (and device calls) of the last single-process `generate`."""
  return dict(_LAST_STATS)


def generate(
  model,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_p: float = 1.0,
  top_k: int = 0,
  seed: int | Sequence[int] = 0,
  eos_ids: Sequence[int] | None = None,
  pad_id: int = 0,
  num_samples: int = 1,
  mesh=None,
  rules=sharding.DEFAULT_RULES,
  prompt_len: int | None = None,
  max_new_tokens_per_row: Sequence[int] | None = None,
  engine: str = "continuous",
  engine_options: continuous.EngineOptions | None = None,
  on_row_done: continuous.Callback | None = None,
  decode_layout: str = "auto",
) -> Rollout:
  """Sample up to `max_new_tokens` continuations of each prompt (a list of token-id lists).

  Rows stop independently after an id in `eos_ids` (None: run to their cap). temperature=0 is
  greedy. `num_samples=K` returns K continuations per prompt (rows b*K .. b*K+K-1), sharing one
  prefill. `max_new_tokens_per_row` caps each row (B*K values, or B, one per prompt). A row's
  samples depend only on its prompt, the seed and its sample index (see `rows.row_keys`).
  `seed` may also be one seed per prompt: prompts with different seeds draw independent streams,
  so one call can serve several requests exactly as separate calls would (the teacher server).

  engine="continuous" (default) decodes in `engine_options.num_slots` slots over a paged KV
  cache, refilling a slot as soon as its row ends (num_slots=0: one slot per row);
  engine="static" is the single while-loop program of `make_generate_fn` (also what runs with a
  mesh over several processes). Under a single-process mesh the continuous engine splits its
  slots over the batch axes (num_slots rounded up to a multiple of them).
  `on_row_done(row, tokens, logprobs, entropy)` is called on the host as each row ends (the
  continuous engine calls it while other rows still decode). Parameter values may change freely
  between calls: programs compile once per shape bucket. With a mesh, the parameters are first
  resharded on device into `decode_layout` (auto: replicated when they fit, else tensor-sharded;
  train: keep their training shardings), rows split over the batch axes.
  """
  if engine not in ENGINES:
    raise ValueError(f"engine={engine!r}: one of {ENGINES}")
  options = SamplingOptions(
    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
    eos_ids=tuple(eos_ids or ()), pad_id=pad_id, num_samples=num_samples,
  )  # fmt: skip
  caps = row_identity.row_caps(max_new_tokens_per_row, len(prompts), num_samples, max_new_tokens)
  row_identity.check_seeds(seed, len(prompts))
  graphdef, state = nnx.split(model)
  if mesh is not None:
    state, rules = decode_sharding.decode_layout_state(state, mesh, rules, decode_layout)
  use_continuous = continuous_engine_used(engine, mesh)
  if use_continuous and mesh is not None and mesh.size > 1:
    n_rows = len(prompts) * num_samples
    width = max(prompt_len or 0, max(len(p) for p in prompts))
    use_continuous = continuous.replicated_pool_fits(model.config, model.dtype, engine_options, n_rows,
                                          width + max_new_tokens)  # fmt: skip
  if use_continuous:
    out = _generate_continuous(graphdef, state, options, prompts, caps, seed, prompt_len,
                               engine_options, on_row_done, mesh, rules)  # fmt: skip
  else:
    out = _generate_static(graphdef, state, options, prompts, caps, seed, prompt_len, mesh, rules)
  n = len(prompts) * num_samples
  rollout = Rollout(*(np.asarray(out[name][:n]) for name in Rollout._fields))
  if on_row_done is not None and not use_continuous:
    for row in range(n):  # no overlap here: the whole batch ended together
      k = int(rollout.mask[row].sum())
      on_row_done(row, rollout.tokens[row, :k], rollout.logprobs[row, :k], rollout.entropy[row, :k])
  return rollout


def continuous_engine_used(engine: str, mesh=None) -> bool:
  """Whether `generate(engine=..., mesh=...)` runs the continuous engine (rows end one by one and
  `on_row_done` fires while others decode) rather than the static one. Several processes keep
  the static engine: each process would run its own host schedule over one global program."""
  return engine == "continuous" and (mesh is None or jax.process_count() == 1)


_row_keys_jit = jax.jit(row_identity.row_keys, static_argnums=3)


def _generate_continuous(
  graphdef, state, options, prompts, caps, seed, prompt_len, eopts, done, mesh=None, rules=()
):
  n_rows = len(prompts) * options.num_samples
  eopts = eopts or continuous.EngineOptions()
  slots = max(eopts.num_slots or bucket(n_rows, BATCH_BUCKETS), options.num_samples)
  if mesh is not None:  # every device decodes as many slots
    multiple = continuous.rows_per_shard_multiple(mesh, rules)
    slots = -(-slots // multiple) * multiple
  eopts = dataclasses.replace(eopts, num_slots=slots)
  key = (graphdef, options, eopts, mesh, tuple(rules) if mesh is not None else ())
  if key not in _ENGINES:
    _ENGINES[key] = continuous.Engine(
      graphdef, options, eopts, _sample_fn(options), _lm_head, mesh=mesh,
      rules=rules if mesh is not None else sharding.DEFAULT_RULES,
    )  # fmt: skip
  width = max(prompt_len or 0, max(len(p) for p in prompts)) if prompt_len else None
  tokens, mask = pad_prompts(prompts, pad_id=options.pad_id, prompt_len=width)
  keys = _row_keys_jit(
    row_identity.seed_array(seed, len(tokens)), tokens, mask, options.num_samples
  )
  all_caps = np.zeros(len(tokens) * options.num_samples, np.int32)
  all_caps[:n_rows] = caps
  out, emitted = _ENGINES[key].run(state, tokens, mask, keys, all_caps, done)
  _LAST_STATS.clear()
  _LAST_STATS.update(_ENGINES[key].last_stats, engine="continuous", slots=eopts.num_slots)
  out = jax.device_get(out)
  out["mask"] = np.arange(options.max_new_tokens)[None, :] < emitted[:, None]
  return out


def _sample_fn(options):
  return lambda logits, keys, steps: sample_step(logits, keys, steps, options)


def _generate_static(graphdef, state, options, prompts, caps, seed, prompt_len, mesh, rules):
  rules = tuple(rules)
  fn_key = (graphdef, options, mesh, rules)
  if fn_key not in _GENERATE_FNS:
    _GENERATE_FNS[fn_key] = make_generate_fn(graphdef, options, mesh=mesh, rules=rules, state=state)
  fn = _GENERATE_FNS[fn_key]
  k = options.num_samples
  multiple = 1
  if mesh is not None:
    multiple = int(np.prod([mesh.shape[a] for a in rows_axes(mesh, rules)]))
  if mesh is not None and jax.process_count() > 1:
    if np.ndim(seed):
      raise ValueError("per-prompt seeds are single-process: pass one seed with several processes.")
    # Multi-host: every process passes its own rows; the program sees one global batch, so the
    # padded shapes must agree across processes (pass `prompt_len`; the batch is not bucketed).
    local = multiple // jax.process_count()
    size = -(-len(prompts) // max(local, 1)) * max(local, 1)
    tokens, mask = pad_prompts(
      prompts, batch_size=size, prompt_len=prompt_len, pad_id=options.pad_id
    )
    local_caps = np.zeros(size * k, np.int32)
    local_caps[: len(caps)] = caps
    rows = sharding.batch_sharding(mesh, 2, rules)
    tokens, mask = (jax.make_array_from_process_local_data(rows, x) for x in (tokens, mask))
    caps_sh = sharding.batch_sharding(mesh, 1, rules)
    global_caps = jax.make_array_from_process_local_data(caps_sh, local_caps)
    out = fn(state, tokens, mask, seed, global_caps)
    return {name: _process_rows(v) for name, v in out.items() if name != "steps"}
  tokens, mask = pad_prompts(
    prompts, pad_id=options.pad_id, batch_multiple=multiple,
    prompt_len=max(prompt_len or 0, max(len(p) for p in prompts)) if prompt_len else None,
  )  # fmt: skip
  padded_caps = np.zeros(len(tokens) * k, np.int32)
  padded_caps[: len(caps)] = caps
  out = jax.device_get(
    fn(state, tokens, mask, row_identity.seed_array(seed, len(tokens)), padded_caps)
  )
  _LAST_STATS.clear()
  _LAST_STATS.update(engine="static", slots=len(out["tokens"]), decode_steps=int(out["steps"]))
  return out


def _process_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a row-sharded global array, in order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for shard in shards:  # replicas of the same rows appear once
    start = shard.index[0].start or 0
    if start not in seen:
      seen.add(start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows, axis=0)


def rows_axes(mesh, rules=sharding.DEFAULT_RULES) -> tuple[str, ...]:
  """Mesh axes the batch dimension is split over (a batch must be a multiple of their product)."""
  target = dict(rules).get("batch")
  return (target,) if isinstance(target, str) else tuple(target or ())


def draft_chunks(model, prefixes, *, num_drafts: int, chunk_len: int, **kwargs) -> Rollout:
  """K alternative chunk drafts of C tokens after each prefix (the "group" chunk-weight form).

  `prefixes` are token-id lists (prompt plus the response up to the fork). Each prefix is
  prefilled once and its cache shared by the K drafts. Returns a Rollout of [N, K, C] arrays.
  Other keyword arguments (temperature, top_p, top_k, seed, eos_ids, mesh) go to `generate`.
  """
  out = generate(model, prefixes, max_new_tokens=chunk_len, num_samples=num_drafts, **kwargs)
  n = len(prefixes)
  return Rollout(*(x.reshape(n, num_drafts, chunk_len) for x in out))
