"""Token statistics and fork selection (device side, jittable): where the teacher is asked to audit.

`token_logprobs` and `token_entropy` are the one definition of a token's log-prob and its
distribution's entropy: the sampler, the losses and fork selection all call them.

A fork is the start t of a chunk of C student tokens y_t..y_{t+C-1}; the teacher continues the
response from just before y_t. Positions index the generated tokens (0 = first generated token).
"""

import functools

import jax
import jax.numpy as jnp

METHODS = ("peak", "random")


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets) in float32: [..., V], [...] -> [...].

  Float32 because bf16 log-probs are off by ~1e-2 nats.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [..., V]
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_entropy(logits: jax.Array) -> jax.Array:
  """Full-vocabulary entropy H = -sum_v p_v log p_v of softmax(logits), in float32.

  Float32 because bf16 logits lose the small probabilities that make up most of the entropy.
  log_softmax shifts z by its max first, so logits near 1e4 lose nothing to rounding. Entries at
  -inf (masked or padded vocabulary) contribute 0.

  Args:
    logits: [..., V] any float dtype, temperature-1 logits.

  Returns:
    [...] float32 entropy in nats.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [..., V]
  p = jnp.exp(logp)  # [..., V]
  return -jnp.where(p > 0, p * logp, 0.0).sum(axis=-1)  # 0 * -inf would be NaN


def logprob_and_entropy(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log p(token), entropy of softmax(logits)), both float32: [..., V], [...] -> [...], [...]."""
  return token_logprobs(logits, tokens), token_entropy(logits)


def _greedy_non_overlapping(keys, eligible, num_forks, chunk_len):
  """Repeatedly take the highest-key eligible position (ties: the later one) and block +-C.

  Args:
    keys: [B, L] float32 priorities (no NaN).
    eligible: [B, L] bool positions where a chunk may start.
    num_forks: M, static.
    chunk_len: C, static.

  Returns:
    starts [B, M] int32 (0 in unfilled slots), valid [B, M] bool.
  """
  pos = jnp.arange(keys.shape[1], dtype=jnp.int32)  # [L]

  def pick(available, _):
    best = jnp.max(jnp.where(available, keys, -jnp.inf), axis=1, keepdims=True)  # [B, 1]
    is_best = available & (keys == best)  # [B, L]; keys == -inf ties are handled too
    start = jnp.max(jnp.where(is_best, pos, -1), axis=1)  # [B]; -1 when nothing is available
    found = start >= 0  # [B]
    start = jnp.maximum(start, 0)
    # Later chunks must satisfy |t - start| >= C; rows with nothing found stay as they are.
    overlaps = jnp.abs(pos[None, :] - start[:, None]) < chunk_len  # [B, L]
    available = available & ~(overlaps & found[:, None])
    return available, (start, found)

  _, (starts, valid) = jax.lax.scan(pick, eligible, None, length=num_forks)  # [M, B] each
  return starts.T.astype(jnp.int32), valid.T


@functools.partial(jax.jit, static_argnames=("num_forks", "chunk_len", "method"))
def select_forks(
  entropy: jax.Array,
  mask: jax.Array,
  *,
  num_forks: int,
  chunk_len: int,
  method: str = "peak",
  rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Chooses up to M non-overlapping chunk starts per row (the peak-entropy scheduler).

  A chunk starting at t must fit inside the row: t + C <= T_row, T_row = mask.sum(). Chosen
  chunks never overlap (|t - u| >= C). "peak": greedy by descending entropy, ties to the later
  position (NaN entropy counts as -inf). "random": the same greedy procedure on i.i.d. uniform
  keys, i.e. each slot is a uniformly random start among those still free (the ablation).
  Fewer than M may fit; the remaining slots have valid=False and start 0, never a low-entropy pad.
  Slots are filled in selection order (slot 0 = highest entropy for "peak").

  Args:
    entropy: [B, L] float, entropy of each generated token's distribution.
    mask: [B, L] bool, True for generated tokens up to and including EOS (a prefix of the row).
    num_forks: M, static.
    chunk_len: C >= 1, static.
    method: "peak" or "random", static.
    rng: PRNG key, required for "random".

  Returns:
    starts [B, M] int32 and valid [B, M] bool.
  """
  if method not in METHODS:
    raise ValueError(f"select_forks: method must be one of {METHODS}, got {method!r}.")
  if num_forks < 1 or chunk_len < 1:
    raise ValueError(
      f"select_forks: need num_forks >= 1, chunk_len >= 1; got {num_forks}, {chunk_len}."
    )
  if entropy.ndim != 2 or entropy.shape != mask.shape:
    raise ValueError(
      f"select_forks: entropy and mask must both be [B, L]; got {entropy.shape}, {mask.shape}."
    )
  keys = _priorities(entropy, method, rng, entropy.shape, rows=None)
  return _greedy_non_overlapping(keys, _eligible(mask, chunk_len), num_forks, chunk_len)


@functools.partial(jax.jit, static_argnames=("num_rows", "num_forks", "chunk_len", "method"))
def select_row_forks(
  entropy: jax.Array,
  mask: jax.Array,
  row: jax.Array,
  *,
  num_rows: int,
  num_forks: int,
  chunk_len: int,
  method: str = "peak",
  rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`select_forks` for row `row` of a [num_rows, L] batch, from that row alone: exactly the
  forks select_forks would give it (a row's choice never depends on the other rows; "random"
  draws the batch's [num_rows, L] keys and keeps the row's). The collector calls it as each row
  of a rollout ends (methods/omniopd.py, rollout.overlap_teacher).

  Args:
    entropy, mask: [L] the row's entropies and generated-token mask; row: int32 scalar.

  Returns:
    starts [M] int32 and valid [M] bool.
  """
  if method not in METHODS:
    raise ValueError(f"select_row_forks: method must be one of {METHODS}, got {method!r}.")
  entropy, mask = entropy[None], mask[None]  # [1, L]
  keys = _priorities(entropy, method, rng, (num_rows, entropy.shape[1]), rows=row)
  starts, valid = _greedy_non_overlapping(keys, _eligible(mask, chunk_len), num_forks, chunk_len)
  return starts[0], valid[0]


def _eligible(mask, chunk_len: int):
  """[B, L] positions where a chunk of C fits inside its row: t + C <= T_row."""
  row_len = mask.astype(jnp.int32).sum(axis=1, keepdims=True)  # [B, 1]
  pos = jnp.arange(mask.shape[1], dtype=jnp.int32)[None, :]  # [1, L]
  return pos + chunk_len <= row_len


def _priorities(entropy, method: str, rng, batch_shape, rows):
  """Greedy keys [B, L]: entropies (NaN as -inf) for "peak"; for "random", uniforms drawn over
  `batch_shape` (the whole batch) of which `rows` (None: all) are kept."""
  if method == "peak":
    keys = entropy.astype(jnp.float32)
    return jnp.where(jnp.isnan(keys), -jnp.inf, keys)  # [B, L]
  if rng is None:
    raise ValueError("select_forks: method='random' needs rng=jax.random.key(...).")
  keys = jax.random.uniform(rng, batch_shape, jnp.float32)  # [num_rows, L]
  return keys if rows is None else keys[rows][None]


def fork_metrics(entropy: jax.Array, mask: jax.Array, starts: jax.Array, valid: jax.Array) -> dict:
  """Fork diagnostics as scalar float32 arrays (jittable; call float() on the host).

  Args:
    entropy: [B, L], mask: [B, L] bool (as for select_forks).
    starts, valid: [B, M] from select_forks.

  Returns:
    forks/entropy_mean: mean entropy over generated tokens; forks/entropy_at_forks: mean entropy
    at the chosen starts (NaN-free: 0 when there is none); forks/num_forks_mean: valid forks per
    row; forks/rows_without_forks: fraction of rows that got no fork.
  """
  entropy = entropy.astype(jnp.float32)
  maskf = mask.astype(jnp.float32)  # [B, L]
  validf = valid.astype(jnp.float32)  # [B, M]
  at_forks = jnp.take_along_axis(entropy, starts, axis=1)  # [B, M]
  num_valid = validf.sum(axis=1)  # [B]
  # where, not multiply: padded positions may hold garbage (NaN) entropies.
  ent_sum = jnp.where(mask, entropy, 0.0).sum()
  fork_sum = jnp.where(valid, at_forks, 0.0).sum()
  return {
    "forks/entropy_mean": ent_sum / jnp.maximum(maskf.sum(), 1.0),
    "forks/entropy_at_forks": fork_sum / jnp.maximum(validf.sum(), 1.0),
    "forks/num_forks_mean": num_valid.mean(),
    "forks/rows_without_forks": (num_valid == 0).astype(jnp.float32).mean(),
  }
