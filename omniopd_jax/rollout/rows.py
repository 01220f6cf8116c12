"""Per-row identity of a rollout: its PRNG key and its length cap, from what the row is (prompt,
seed, sample index), never from where it sits (slot, batch position, process).

  keys = rows.row_keys(seed, prompt_tokens, prompt_mask, num_samples)  # [B*K] PRNG keys
  caps = rows.row_caps([30, 512, 12], n_prompts=3, num_samples=1, max_new_tokens=512)
"""

import jax
import jax.numpy as jnp
import numpy as np

# Odd multiplier of the prompt hash (the golden ratio in 32 bits).
_HASH_MULTIPLIER = 0x9E3779B1


def _hash_powers(width: int) -> np.ndarray:
  """[width] uint32 multipliers M^(width-1-i) mod 2^32 of a right-aligned polynomial hash."""
  out, power = np.zeros(width, np.uint32), 1
  for i in range(width - 1, -1, -1):
    out[i] = power
    power = power * _HASH_MULTIPLIER % 2**32
  return out


def row_keys(seed, prompt_tokens, prompt_mask, num_samples: int):
  """One PRNG key per output row [B*K]: from the seed, the prompt's tokens, its occurrence among
  equal prompts of the call and the sample index; never from the row's position or padding.

  seed: one uint32 for every prompt, or [B] (one per prompt: prompts with different seeds are
  independent streams, and occurrence counts only equal prompts under the same seed, so a call
  that gathers several requests' prompts gives each the keys it would get alone).
  prompt_tokens/prompt_mask [B, P] are left-padded: the hash weighs token i by M^(P-1-i), so
  the same prompt hashes alike under any prompt bucket. All-padding rows get some key (unused).
  """
  p = prompt_tokens.shape[1]
  weights = jnp.asarray(_hash_powers(p))  # [P] uint32
  terms = (prompt_tokens.astype(jnp.uint32) + 1) * weights  # wraps mod 2^32
  digest = jnp.sum(jnp.where(prompt_mask, terms, 0), axis=1, dtype=jnp.uint32)  # [B]
  seeds = jnp.broadcast_to(jnp.asarray(seed, jnp.uint32), digest.shape)  # [B]
  real = prompt_mask.any(axis=1)  # [B]
  earlier = jnp.tril(jnp.ones((len(digest),) * 2, bool), -1)  # [B, B]: j < i
  same = (digest[:, None] == digest[None, :]) & (seeds[:, None] == seeds[None, :])
  occurrence = (same & real[None, :] & earlier).sum(axis=1).astype(jnp.uint32)  # [B]
  sample = jnp.arange(num_samples, dtype=jnp.uint32)  # [K]
  index = (occurrence[:, None] * num_samples + sample[None, :]).reshape(-1)  # [B*K]
  per_prompt = jax.vmap(lambda s, d: jax.random.fold_in(jax.random.key(s), d))(seeds, digest)
  return jax.vmap(jax.random.fold_in)(jnp.repeat(per_prompt, num_samples), index)


def check_seeds(seed, n_prompts: int) -> None:
  """A per-prompt seed sequence must give exactly one seed per prompt."""
  if np.ndim(seed) and np.size(seed) != n_prompts:
    raise ValueError(
      f"{np.size(seed)} per-prompt seeds for {n_prompts} prompts: give one per prompt."
    )


def seed_array(seed, rows: int):
  """`generate`'s seed for `rows` padded prompts: one uint32, or [rows] uint32 from a sequence of
  per-prompt seeds (`check_seeds` first; padding rows get 0, their keys are never used)."""
  if np.ndim(seed) == 0:
    return np.uint32(int(seed) % 2**32)
  seeds = np.asarray(seed, np.int64).reshape(-1)
  if len(seeds) > rows:
    raise ValueError(f"{len(seeds)} per-prompt seeds for {rows} padded prompts.")
  out = np.zeros(rows, np.uint32)
  out[: len(seeds)] = seeds % 2**32
  return out


def row_caps(per_row, n_prompts: int, num_samples: int, max_new_tokens: int) -> np.ndarray:
  """Per-row length caps [B*K] int32 (default: max_new_tokens everywhere), validated."""
  n = n_prompts * num_samples
  if per_row is None:
    return np.full(n, max_new_tokens, np.int32)
  caps = np.asarray(per_row, np.int64).reshape(-1)
  if len(caps) == n_prompts and num_samples > 1:
    caps = np.repeat(caps, num_samples)
  if len(caps) != n or caps.min() < 1 or caps.max() > max_new_tokens:
    raise ValueError(
      f"max_new_tokens_per_row needs {n} (or {n_prompts}) caps in [1, {max_new_tokens}], got "
      f"{len(caps)} in [{caps.min()}, {caps.max()}]"
    )
  return caps.astype(np.int32)
