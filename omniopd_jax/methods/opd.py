"""White-box OPD: the student's own rollouts scored token by token by a same-tokenizer teacher in
process; per-token reverse KL, either sampled on the student's tokens or exact over the vocabulary.
"""

import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from omniopd_jax.methods import base, losses, packing
from omniopd_jax.ops.vocab_tiling import HeadStats

ESTIMATORS = ("sampled", "full_vocab")


@flax.struct.dataclass
class OPDBatch:
  seq: base.Sequences
  teacher_logprobs: Any = None  # [B, L] float32 log p_T(y) (estimator=sampled; else None)


def check_same_tokenizer(student_tok, teacher_tok):
  """Refuses a teacher whose vocabulary is not the student's, token for token."""
  if teacher_tok is None or student_tok.get_vocab() != teacher_tok.get_vocab():
    raise ValueError(
      "method=opd (white-box OPD) needs a teacher with the student's tokenizer, token for token; "
      "this teacher's vocabulary differs. Use method=omniopd, which needs only the teacher's text."
    )


def collect(ctx: base.Context, model, batch: dict, step: int):
  """Student rollouts, and (estimator=sampled) the teacher's log-probs of their tokens."""
  config = ctx.config
  prompts = base.step_prompts(ctx, batch)
  t0 = time.perf_counter()
  roll = base.rollout(ctx, model, prompts, step)
  rollout_s = time.perf_counter() - t0
  seq = base.pack(prompts, roll.tokens, roll.mask, config.max_prompt_len)
  t0 = time.perf_counter()
  teacher_logprobs = None
  if config.opd.estimator == "sampled":
    teacher_logprobs = np.asarray(ctx.teacher_logprobs_fn(seq))
  metrics = {"rollout/response_len": float(roll.mask.sum(1).mean())}
  timings = dict(rollout=rollout_s, teacher_wait=time.perf_counter() - t0, scoring=0.0)
  return base.done(base.Collected(OPDBatch(seq, teacher_logprobs), metrics, [], timings))


def opd_sampled_loss(
  logits,
  targets,
  teacher_logprobs,
  token_mask,
  *,
  reduction: str = "sequence_sum",
  norm_constant: float | None = None,
  totals=None,
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
  logp = losses.token_logprobs(logits, targets)  # [B, T]
  advantage = jax.lax.stop_gradient(teacher_logprobs.astype(jnp.float32) - logp)  # [B, T]
  loss_value = losses.masked_reduce(-advantage * logp, mask, reduction, norm_constant, totals)
  return loss_value, {
    "opd/reverse_kl_estimate": losses.masked_mean(-advantage, mask),
    "loss/logprob_mean": losses.masked_mean(logp, mask),
  }


def reverse_kl_to_teacher(logits, teacher_logits) -> jax.Array:
  """Exact full-vocabulary reverse KL(p || p_teacher) = sum_v p (log p - log p_teacher) per token.

  `logits` may be the tiled head's HeadStats (its kl_teacher, computed tile by tile).

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
  teacher_logp = jax.lax.stop_gradient(losses.log_softmax32(teacher_logits))  # [B, T, V]
  logp = losses.log_softmax32(logits)  # [B, T, V]
  return jnp.sum(jnp.exp(logp) * (logp - teacher_logp), axis=-1)


def opd_full_kl_loss(
  logits,
  teacher_logits,
  token_mask,
  *,
  reduction: str = "sequence_sum",
  norm_constant: float | None = None,
  totals=None,
) -> tuple[jax.Array, dict]:
  """White-box OPD with teacher logits at hand: x_bt = KL(p || p_T)_bt, exact over the vocabulary.

  Args:
    logits, teacher_logits: [B, T, V] (same vocabulary); token_mask: [B, T] bool.

  Returns:
    (loss, aux): opd/reverse_kl_mean per masked token.
  """
  mask = token_mask.astype(bool)
  kl = reverse_kl_to_teacher(logits, teacher_logits)  # [B, T]
  return losses.masked_reduce(kl, mask, reduction, norm_constant, totals), {
    "opd/reverse_kl_mean": losses.masked_mean(kl, mask)
  }


def loss(config, logits, batch: OPDBatch, base_logits=None, teacher_logits=None):
  """(loss, aux) of one (micro-)batch; logits [B, L, V] predict batch.seq.response_tokens."""
  del base_logits
  seq = batch.seq
  norm = config.omniopd.norm_constant or seq.response_tokens.shape[1]
  if config.opd.estimator == "full_vocab":
    return opd_full_kl_loss(logits, teacher_logits, seq.response_mask, norm_constant=norm)
  return opd_sampled_loss(
    logits, seq.response_tokens, batch.teacher_logprobs, seq.response_mask, norm_constant=norm
  )


def token_fields(config, batch: OPDBatch) -> dict:
  """Per-token inputs of a packed update (methods/packing.py): the teacher's [B, L] log-probs."""
  if config.opd.estimator == "full_vocab":
    return {}
  return {"teacher_logprobs": batch.teacher_logprobs}


def packed_loss(config, logits, batch: packing.PackedBatch, base_logits=None, teacher_logits=None):
  """`loss` of a packed (micro-)batch; logits [R, S, V] (or HeadStats) predict batch.targets."""
  del base_logits
  norm = config.omniopd.norm_constant or batch.response_len
  totals = packing.totals(batch)
  if config.opd.estimator == "full_vocab":
    return opd_full_kl_loss(logits, teacher_logits, batch.loss_mask, norm_constant=norm,
                            totals=totals)  # fmt: skip
  return opd_sampled_loss(
    logits, batch.targets, batch.fields["teacher_logprobs"], batch.loss_mask, norm_constant=norm,
    totals=totals,
  )  # fmt: skip


def abstract_batch(config, rows: int, prompt_len: int, length: int) -> OPDBatch:
  sampled = config.opd.estimator == "sampled"
  teacher_logprobs = jax.ShapeDtypeStruct((rows, length), jnp.float32) if sampled else None
  return OPDBatch(base.abstract_sequences(rows, prompt_len, length), teacher_logprobs)


METHOD = base.Method(
  name="opd",
  collect=collect,
  loss=loss,
  abstract_batch=abstract_batch,
  teacher="model",
  needs_teacher_logits=lambda config: config.opd.estimator == "full_vocab",
  token_fields=token_fields,
  packed_loss=packed_loss,
)
