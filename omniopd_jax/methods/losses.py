"""Loss pieces every method shares (pure jnp): the exact KL anchor to the frozen base, masked
reductions, and the token log-prob (rollout.forks.token_logprobs, one definition for the sampler
and the losses). Each method's own loss lives in its module (methods/omniopd.py, ...).

Shapes: logits [B, T, V] aligned with targets [B, T] (logits[:, t] predicts targets[:, t]), or
the tiled head's HeadStats (ops/vocab_tiling.py: the same per-token values, never [B, T, V]);
token_mask [B, T] bool marks the tokens that count. Softmax, log-probs and KL are float32.
"""

import jax
import jax.numpy as jnp

from omniopd_jax.ops.vocab_tiling import HeadStats
from omniopd_jax.rollout import forks

__all__ = ["REDUCTIONS", "kl_anchor", "kl_to_base", "log_softmax32", "masked_mean",
           "masked_reduce", "token_logprobs"]  # fmt: skip

REDUCTIONS = ("sequence_sum", "token_mean")


def log_softmax32(logits: jax.Array) -> jax.Array:
  """[..., V] -> float32 log-probabilities (float32: bf16 log-probs are off by ~1e-2 nats)."""
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def token_logprobs(logits, targets: jax.Array) -> jax.Array:
  """log p(targets) [B, T] float32, from logits [B, T, V] or from the tiled head's HeadStats."""
  if isinstance(logits, HeadStats):
    return logits.logprob
  return forks.token_logprobs(logits, targets)


def kl_to_base(base_logits, logits) -> jax.Array:
  """Exact full-vocabulary KL(p_base || p) = sum_v p_base (log p_base - log p) per token.

  The base distribution gets no gradient; d KL / d logits = p - p_base.

  Returns:
    [B, T] float32.
  """
  if isinstance(logits, HeadStats):  # computed tile by tile with the base's hidden states
    return logits.kl_base
  base_logp = jax.lax.stop_gradient(log_softmax32(base_logits))  # [B, T, V]
  logp = log_softmax32(logits)  # [B, T, V]
  return jnp.sum(jnp.exp(base_logp) * (base_logp - logp), axis=-1)


def kl_anchor(base_logits, logits, like: jax.Array, *, enabled: bool, who: str) -> jax.Array:
  """Per-token KL(p_base || p) [B, T], zeros (shaped like `like`) when there is no base.

  `enabled` (the method's KL anchor is on) with no base_logits is a caller error.
  """
  if enabled and base_logits is None:
    raise ValueError(f"{who}: kl_anchor=True needs base_logits (or set kl_anchor=False).")
  return kl_to_base(base_logits, logits) if base_logits is not None else jnp.zeros_like(like)


def masked_reduce(
  per_token: jax.Array, mask: jax.Array, reduction: str, norm_constant: float | None = None,
  totals=None,
) -> jax.Array:  # fmt: skip
  """Reduces [B, T] per-token losses over the True entries of mask.

  "sequence_sum": mean over rows that have any token of (sum_t x_bt) / norm_constant
    (default norm_constant: T). A constant divisor keeps every token's weight independent of the
    length of its response; fully masked (padding) rows do not count.
  "token_mean": sum_bt x_bt / (number of tokens).
  `totals` (packed batches, methods.packing.Totals): the row and token counts to divide by,
  counted over the global batch, in place of this batch's own rows of `mask` (a packed row holds
  several sequences, so rows of `mask` are not sequences).
  """
  mask = mask.astype(bool)
  total = jnp.where(mask, per_token, 0.0)  # where, not *: garbage at padding must not leak
  if reduction == "sequence_sum":
    norm = per_token.shape[-1] if norm_constant is None else norm_constant
    rows = jnp.any(mask, axis=-1).sum() if totals is None else totals.rows
    rows = jnp.where(rows > 0, rows, 1)  # (a packed share may be fractional: no max(., 1))
    return total.sum() / (norm * rows)
  if reduction == "token_mean":
    tokens = mask.sum() if totals is None else totals.tokens
    return total.sum() / jnp.where(tokens > 0, tokens, 1)
  raise ValueError(f"Unknown reduction {reduction!r}; choose one of {REDUCTIONS}.")


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x over the True entries of mask (0 when there is none)."""
  return jnp.where(mask, x, 0.0).sum() / jnp.maximum(mask.sum(), 1)
