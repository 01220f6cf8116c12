"""GRPO (self-exploratory RL): G samples per prompt, a verifiable reward, group-normalised
advantages (host, numpy), and the clipped-ratio loss with the same KL anchor as OmniOPD (device).
"""

import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from omniopd_jax.data import grading
from omniopd_jax.methods import base, losses, packing


@flax.struct.dataclass
class GRPOBatch:
  seq: base.Sequences
  advantages: Any  # [B] float32 group-normalised advantage of each row
  old_logprobs: Any  # [B, L] float32 log-probs of the sampling policy


def group_advantages(
  rewards, group_size: int, *, eps: float = 1e-6, normalize_std: bool = True
) -> np.ndarray:
  """Group-normalised advantages A_i = (r_i - mean_g r) / (std_g r + eps), on the host.

  Rows b*G .. b*G + G - 1 are the G samples of one prompt; std is the population std (ddof 0);
  normalize_std=False gives r_i - mean (Dr. GRPO).

  Args:
    rewards: [B] float, B a multiple of group_size.

  Returns:
    [B] float32.
  """
  rewards = np.asarray(rewards, np.float32)
  if rewards.ndim != 1 or rewards.shape[0] % group_size:
    raise ValueError(
      f"group_advantages: rewards must be [B] with B a multiple of {group_size}; "
      f"got {rewards.shape}."
    )
  r = rewards.reshape(-1, group_size)  # [B/G, G]
  adv = r - r.mean(axis=1, keepdims=True)
  if normalize_std:
    adv = adv / (r.std(axis=1, keepdims=True) + np.float32(eps))
  return adv.reshape(-1).astype(np.float32)


def grade_rows(tokenizer, tokens, mask, examples) -> np.ndarray:
  """1.0 where a row's decoded response has the example's answer, else 0.0: [B] float32."""
  texts = tokenizer.batch_decode(
    np.where(mask, tokens, tokenizer.pad_token_id or 0), skip_special_tokens=True
  )
  return np.array([grading.grade(t, ex) for t, ex in zip(texts, examples)], np.float32)


def collect(ctx: base.Context, model, batch: dict, step: int):
  """G samples per prompt, verifiable rewards, group-normalised advantages."""
  config, g = ctx.config, ctx.config.grpo.group_size
  prompts = base.step_prompts(ctx, batch)
  t0 = time.perf_counter()
  roll = base.rollout(ctx, model, prompts, step, num_samples=g)
  rollout_s = time.perf_counter() - t0
  examples = [ex for ex in batch["examples"] for _ in range(g)]
  t0 = time.perf_counter()
  rewards = grade_rows(ctx.tokenizer, roll.tokens, roll.mask, examples)  # [B*G]
  score_s = time.perf_counter() - t0
  seq = base.pack([p for p in prompts for _ in range(g)], roll.tokens, roll.mask,
                  config.max_prompt_len)  # fmt: skip
  out = GRPOBatch(seq=seq, advantages=group_advantages(rewards, g), old_logprobs=roll.logprobs)
  metrics = {
    "grpo/reward_mean": float(rewards.mean()),
    "grpo/solved_groups": float((rewards.reshape(-1, g).max(1) > 0).mean()),
    "rollout/response_len": float(roll.mask.sum(1).mean()),
  }
  timings = dict(rollout=rollout_s, teacher_wait=0.0, scoring=score_s)
  return base.done(base.Collected(out, metrics, [], timings))


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
  totals=None,
) -> tuple[jax.Array, dict]:
  """GRPO with a clipped importance ratio and the same exact KL anchor as OmniOPD.

  r_bt = exp(log p(y_bt) - log p_old(y_bt));
  x_bt = -min(r_bt A_b, clip(r_bt, 1 - eps, 1 + eps) A_b) + beta * KL(p_base || p)_bt,
  over tokens with token_mask, then `masked_reduce`.

  Args:
    logits: [B, T, V]; old_logprobs: [B, T] log-probs of the sampling policy; targets: [B, T];
    token_mask: [B, T] bool; advantages: [B] (group_advantages) or [B, T] per token (packed);
    base_logits: [B, T, V], may be None when kl_anchor=False; totals: a packed batch's global
    normalisers (losses.masked_reduce).

  Returns:
    (loss, aux): loss/pg, loss/kl_anchor, grpo/clip_frac, grpo/ratio_mean, kl/mean.
  """
  mask = token_mask.astype(bool)
  logp = losses.token_logprobs(logits, targets)  # [B, T]
  ratio = jnp.exp(logp - old_logprobs.astype(jnp.float32))  # [B, T]
  adv = jnp.asarray(advantages, jnp.float32)
  adv = adv if adv.ndim == 2 else adv[:, None]  # [B, T] or [B, 1]
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  pg = -jnp.minimum(ratio * adv, clipped * adv)  # [B, T]
  kl = losses.kl_anchor(base_logits, logits, logp, enabled=kl_anchor, who="grpo_loss")  # [B, T]
  pg_loss = losses.masked_reduce(pg, mask, reduction, norm_constant, totals)
  kl_loss = (
    losses.masked_reduce(beta * kl, mask, reduction, norm_constant, totals)
    if kl_anchor
    else jnp.float32(0.0)
  )
  aux = {
    "loss/pg": pg_loss,
    "loss/kl_anchor": kl_loss,
    "grpo/clip_frac": losses.masked_mean(
      (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), mask
    ),
    "grpo/ratio_mean": losses.masked_mean(ratio, mask),
    "kl/mean": losses.masked_mean(kl, mask),
  }
  return pg_loss + kl_loss, aux


def loss(config, logits, batch: GRPOBatch, base_logits=None, teacher_logits=None):
  """(loss, aux) of one (micro-)batch; logits [B, L, V] predict batch.seq.response_tokens."""
  del teacher_logits
  g, seq = config.grpo, batch.seq
  return grpo_loss(
    logits, batch.old_logprobs, seq.response_tokens, seq.response_mask, batch.advantages,
    base_logits=base_logits, beta=g.beta, clip_eps=g.clip_eps,
    norm_constant=config.omniopd.norm_constant or seq.response_tokens.shape[1],
    kl_anchor=g.beta > 0,
  )  # fmt: skip


def token_fields(config, batch: GRPOBatch) -> dict:
  """Per-token inputs of a packed update (methods/packing.py): [B, L] and [B] numpy."""
  del config
  return {"old_logprobs": batch.old_logprobs, "advantages": batch.advantages}


def packed_loss(config, logits, batch: packing.PackedBatch, base_logits=None, teacher_logits=None):
  """`loss` of a packed (micro-)batch; logits [R, S, V] (or HeadStats) predict batch.targets."""
  del teacher_logits
  g, f = config.grpo, batch.fields
  return grpo_loss(
    logits, f["old_logprobs"], batch.targets, batch.loss_mask, f["advantages"],
    base_logits=base_logits, beta=g.beta, clip_eps=g.clip_eps,
    norm_constant=config.omniopd.norm_constant or batch.response_len, kl_anchor=g.beta > 0,
    totals=packing.totals(batch),
  )  # fmt: skip


def abstract_batch(config, rows: int, prompt_len: int, length: int) -> GRPOBatch:
  del config
  s = jax.ShapeDtypeStruct
  return GRPOBatch(
    seq=base.abstract_sequences(rows, prompt_len, length),
    advantages=s((rows,), jnp.float32),
    old_logprobs=s((rows, length), jnp.float32),
  )


METHOD = base.Method(
  name="grpo",
  collect=collect,
  loss=loss,
  abstract_batch=abstract_batch,
  needs_base=lambda config: config.grpo.beta > 0,
  samples_per_prompt=lambda config: config.grpo.group_size,
  token_fields=token_fields,
  packed_loss=packed_loss,
)
