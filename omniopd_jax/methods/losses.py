"""Losses (pure jnp): OmniOPD with its KL anchor, white-box OPD, GRPO and SFT.

Shapes: logits [B, T, V] aligned with targets [B, T] (logits[:, t] predicts targets[:, t]);
token_mask [B, T] bool marks the tokens that count. Softmax, log-probs and KL are float32.
Wherever logits are taken, an ops.vocab_tiling.HeadStats may stand in for them (for the student,
base and teacher alike): its per-token log-probs and KLs [B, T] were computed without [B, T, V].
"""

import jax
import jax.numpy as jnp

from omniopd_jax.ops.vocab_tiling import HeadStats

REDUCTIONS = ("sequence_sum", "token_mean")


def log_softmax32(logits: jax.Array) -> jax.Array:
  """[..., V] -> float32 log-probabilities (float32: bf16 log-probs are off by ~1e-2 nats)."""
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets) = z_y - logsumexp(z): [B, T, V], [B, T] -> [B, T] float32."""
  if isinstance(logits, HeadStats):
    return logits.logprob
  z = logits.astype(jnp.float32)  # [B, T, V]
  z_y = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B, T]
  return z_y - jax.nn.logsumexp(z, axis=-1)


def kl_to_base(base_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """Exact full-vocabulary KL(p_base || p) = sum_v p_base (log p_base - log p) per token.

  The base distribution gets no gradient; d KL / d logits = p - p_base.

  Returns:
    [B, T] float32.
  """
  if isinstance(logits, HeadStats):
    return logits.kl_base
  base_logp = jax.lax.stop_gradient(log_softmax32(base_logits))  # [B, T, V]
  logp = log_softmax32(logits)  # [B, T, V]
  return jnp.sum(jnp.exp(base_logp) * (base_logp - logp), axis=-1)


def reverse_kl_to_teacher(logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Exact full-vocabulary reverse KL(p || p_teacher) = sum_v p (log p - log p_teacher) per token.

  Returns:
    [B, T] float32; the teacher gets no gradient.
  """
  if isinstance(logits, HeadStats):
    return logits.kl_teacher
  if logits.shape[-1] != teacher_logits.shape[-1]:
    raise ValueError(
      f"teacher vocabulary {teacher_logits.shape[-1]} != student vocabulary {logits.shape[-1]}: "
      "full-vocabulary OPD needs the same tokenizer."
    )
  teacher_logp = jax.lax.stop_gradient(log_softmax32(teacher_logits))  # [B, T, V]
  logp = log_softmax32(logits)  # [B, T, V]
  return jnp.sum(jnp.exp(logp) * (logp - teacher_logp), axis=-1)


def masked_reduce(
  per_token: jax.Array, mask: jax.Array, reduction: str, norm_constant: float | None = None
) -> jax.Array:
  """Reduces [B, T] per-token losses over the True entries of mask.

  "sequence_sum": mean over rows that have any token of (sum_t x_bt) / norm_constant
    (default norm_constant: T). A constant divisor keeps every token's weight independent of the
    length of its response; fully masked (padding) rows do not count.
  "token_mean": sum_bt x_bt / (number of tokens).
  """
  mask = mask.astype(bool)
  total = jnp.where(mask, per_token, 0.0)  # where, not *: garbage at padding must not leak
  if reduction == "sequence_sum":
    norm = per_token.shape[-1] if norm_constant is None else norm_constant
    rows = jnp.maximum(jnp.any(mask, axis=-1).sum(), 1)
    return total.sum() / (norm * rows)
  if reduction == "token_mean":
    return total.sum() / jnp.maximum(mask.sum(), 1)
  raise ValueError(f"Unknown reduction {reduction!r}; choose one of {REDUCTIONS}.")


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.where(mask, x, 0.0).sum() / jnp.maximum(mask.sum(), 1)


def chunk_token_weights(
  starts, valid, weights, chunk_len: int, length: int
) -> tuple[jax.Array, jax.Array]:
  """Spreads per-chunk weights onto the tokens of each chunk.

  Token s of row b is in chunk m when valid[b, m] and starts[b, m] <= s < starts[b, m] + C.
  `starts` index the same axis as the [B, length] output: if the loss's token axis also holds
  the prompt, add its offset to `starts` first. Chunks do not overlap (select_forks).

  Args:
    starts: [B, M] int; valid: [B, M] bool, the audited chunks (RewardArrays.mask);
    weights: [B, M] float chunk weights w_c; chunk_len: C; length: T (static).

  Returns:
    token_weight [B, T] float32 (w_c on chunk tokens, else 0) and audited_tokens [B, T] bool.
  """
  pos = jnp.arange(length)[None, None, :]  # [1, 1, T]
  starts = jnp.asarray(starts)[..., None]  # [B, M, 1]
  in_chunk = (
    jnp.asarray(valid, bool)[..., None] & (pos >= starts) & (pos < starts + chunk_len)
  )  # [B, M, T]
  weights = jnp.asarray(weights, jnp.float32)[..., None]  # [B, M, 1]
  return jnp.where(in_chunk, weights, 0.0).sum(axis=1), in_chunk.any(axis=1)


def omniopd_loss(
  logits,
  base_logits,
  targets,
  token_mask,
  token_weight,
  audited_tokens,
  *,
  beta: float,
  reduction: str = "sequence_sum",
  norm_constant: float | None = None,
  kl_anchor: bool = True,
  kl_on_audited: bool = False,
) -> tuple[jax.Array, dict]:
  """The OmniOPD loss (SPEC §1.6).

  x_bt = -w_bt * log p(y_bt) * [audited_bt]  +  beta * KL(p_base || p)_bt * [not audited_bt]
  over tokens with token_mask, then `masked_reduce`. w_bt is the weight of the chunk holding token
  t (chunk_token_weights); KL is exact over the full vocabulary. kl_anchor=False drops the KL term
  (ablation; base_logits may then be None); kl_on_audited=True anchors every token.

  Args:
    logits, base_logits: [B, T, V] from the student and the frozen base; targets: [B, T] int.
    token_mask: [B, T] bool generated tokens; token_weight: [B, T] float; audited_tokens: [B, T] bool.

  Returns:
    (loss scalar float32, aux dict of scalars: loss/pg, loss/kl_anchor, kl/unaudited_mean,
    omniopd/tokens_audited_frac, omniopd/token_weight_mean, loss/logprob_mean).
  """
  mask = token_mask.astype(bool)
  audited = audited_tokens.astype(bool) & mask
  logp = token_logprobs(logits, targets)  # [B, T]
  pg = jnp.where(audited, -token_weight.astype(jnp.float32) * logp, 0.0)  # [B, T]
  anchored = mask if kl_on_audited else mask & ~audited
  if kl_anchor and base_logits is None:
    raise ValueError("omniopd_loss: kl_anchor=True needs base_logits (or set kl_anchor=False).")
  kl = (
    kl_to_base(base_logits, logits) if base_logits is not None else jnp.zeros_like(logp)
  )  # [B, T]
  kl_term = beta * jnp.where(anchored, kl, 0.0) if kl_anchor else jnp.zeros_like(logp)  # [B, T]
  pg_loss = masked_reduce(pg, mask, reduction, norm_constant)
  kl_loss = masked_reduce(kl_term, mask, reduction, norm_constant)
  aux = {
    "loss/pg": pg_loss,
    "loss/kl_anchor": kl_loss,
    "kl/unaudited_mean": _masked_mean(kl, mask & ~audited),
    "omniopd/tokens_audited_frac": audited.sum() / jnp.maximum(mask.sum(), 1),
    "omniopd/token_weight_mean": _masked_mean(token_weight.astype(jnp.float32), audited),
    "loss/logprob_mean": _masked_mean(logp, mask),
  }
  return pg_loss + kl_loss, aux


def opd_sampled_loss(
  logits,
  targets,
  teacher_logprobs,
  token_mask,
  *,
  reduction: str = "sequence_sum",
  norm_constant: float | None = None,
) -> tuple[jax.Array, dict]:
  """White-box OPD, sampled-token reverse-KL estimator (REINFORCE form).

  x_bt = -sg(log p_T(y_bt) - log p(y_bt)) * log p(y_bt), so grad = (log p - log p_T) grad log p:
  per token, a one-sample estimate of grad KL(p || p_T) on the student's own tokens y ~ p.

  Args:
    logits: [B, T, V]; targets: [B, T] the sampled tokens; teacher_logprobs: [B, T] log p_T(y);
    token_mask: [B, T] bool.

  Returns:
    (loss, aux): opd/reverse_kl_estimate = mean(log p(y) - log p_T(y)) over masked tokens.
  """
  mask = token_mask.astype(bool)
  logp = token_logprobs(logits, targets)  # [B, T]
  advantage = jax.lax.stop_gradient(teacher_logprobs.astype(jnp.float32) - logp)  # [B, T]
  loss = masked_reduce(-advantage * logp, mask, reduction, norm_constant)
  return loss, {
    "opd/reverse_kl_estimate": _masked_mean(-advantage, mask),
    "loss/logprob_mean": _masked_mean(logp, mask),
  }


def opd_full_kl_loss(
  logits,
  teacher_logits,
  token_mask,
  *,
  reduction: str = "sequence_sum",
  norm_constant: float | None = None,
) -> tuple[jax.Array, dict]:
  """White-box OPD with teacher logits at hand: x_bt = KL(p || p_T)_bt, exact over the vocabulary.

  Args:
    logits, teacher_logits: [B, T, V] (same vocabulary); token_mask: [B, T] bool.

  Returns:
    (loss, aux): opd/reverse_kl_mean per masked token.
  """
  mask = token_mask.astype(bool)
  kl = reverse_kl_to_teacher(logits, teacher_logits)  # [B, T]
  return masked_reduce(kl, mask, reduction, norm_constant), {
    "opd/reverse_kl_mean": _masked_mean(kl, mask)
  }


def grpo_advantages(
  rewards, group_size: int, *, eps: float = 1e-6, normalize_std: bool = True
) -> jax.Array:
  """Group-normalised advantages A_i = (r_i - mean_g r) / (std_g r + eps).

  Rows b*G .. b*G + G - 1 are the G samples of one prompt; std is the population std (ddof 0);
  normalize_std=False gives r_i - mean (Dr. GRPO).

  Args:
    rewards: [B] float, B a multiple of group_size.

  Returns:
    [B] float32.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1 or rewards.shape[0] % group_size:
    raise ValueError(
      f"grpo_advantages: rewards must be [B] with B a multiple of {group_size}; got {rewards.shape}."
    )
  r = rewards.reshape(-1, group_size)  # [B/G, G]
  adv = r - r.mean(axis=1, keepdims=True)
  if normalize_std:
    adv = adv / (r.std(axis=1, keepdims=True) + eps)
  return adv.reshape(-1)


def grpo_loss(
  logits,
  old_logprobs,
  targets,
  token_mask,
  advantages,
  *,
  base_logits=None,
  beta: float,
  clip_eps: float = 0.2,
  reduction: str = "sequence_sum",
  norm_constant: float | None = None,
  kl_anchor: bool = True,
) -> tuple[jax.Array, dict]:
  """GRPO with a clipped importance ratio and the same exact KL anchor as OmniOPD.

  r_bt = exp(log p(y_bt) - log p_old(y_bt));
  x_bt = -min(r_bt A_b, clip(r_bt, 1 - eps, 1 + eps) A_b) + beta * KL(p_base || p)_bt,
  over tokens with token_mask, then `masked_reduce`.

  Args:
    logits: [B, T, V]; old_logprobs: [B, T] log-probs of the sampling policy; targets: [B, T];
    token_mask: [B, T] bool; advantages: [B] (grpo_advantages); base_logits: [B, T, V], may be
    None when kl_anchor=False.

  Returns:
    (loss, aux): loss/pg, loss/kl_anchor, grpo/clip_frac, grpo/ratio_mean, kl/mean.
  """
  mask = token_mask.astype(bool)
  logp = token_logprobs(logits, targets)  # [B, T]
  ratio = jnp.exp(logp - old_logprobs.astype(jnp.float32))  # [B, T]
  adv = jnp.asarray(advantages, jnp.float32)[:, None]  # [B, 1]
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  pg = -jnp.minimum(ratio * adv, clipped * adv)  # [B, T]
  if kl_anchor and base_logits is None:
    raise ValueError("grpo_loss: kl_anchor=True needs base_logits (or set kl_anchor=False).")
  kl = (
    kl_to_base(base_logits, logits) if base_logits is not None else jnp.zeros_like(logp)
  )  # [B, T]
  pg_loss = masked_reduce(pg, mask, reduction, norm_constant)
  kl_loss = (
    masked_reduce(beta * kl, mask, reduction, norm_constant) if kl_anchor else jnp.float32(0.0)
  )
  aux = {
    "loss/pg": pg_loss,
    "loss/kl_anchor": kl_loss,
    "grpo/clip_frac": _masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), mask),
    "grpo/ratio_mean": _masked_mean(ratio, mask),
    "kl/mean": _masked_mean(kl, mask),
  }
  return pg_loss + kl_loss, aux


def sft_loss(
  logits, targets, token_mask, *, reduction: str = "token_mean", norm_constant: float | None = None
) -> tuple[jax.Array, dict]:
  """Masked cross-entropy: x_bt = -log p(y_bt) over tokens with token_mask, then `masked_reduce`.

  Returns:
    (loss, aux): loss/nll_token_mean (mean NLL per token whatever the reduction).
  """
  mask = token_mask.astype(bool)
  nll = -token_logprobs(logits, targets)  # [B, T]
  return masked_reduce(nll, mask, reduction, norm_constant), {
    "loss/nll_token_mean": _masked_mean(nll, mask)
  }
