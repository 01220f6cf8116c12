"""SFT: cross-entropy on reference solutions (no sampling, no teacher).

`config.sft.target` picks how a prompt's reference response is written: "answer" (the gold
answer as "Answer: <answer>", any dataset) or "worked" (a step-by-step solution from
data.tasks.worked_solution: arithmetic tasks only, an error elsewhere).
"""

import flax.struct
import jax
import numpy as np

from omniopd_jax.data import tasks
from omniopd_jax.methods import base, losses, packing


@flax.struct.dataclass
class SFTBatch:
  seq: base.Sequences


def answer_target(example: dict) -> str:
  return f"Answer: {example['answer']}"


TARGETS = {"answer": answer_target, "worked": tasks.worked_solution}


def target_text(example: dict, target: str) -> str:
  if target not in TARGETS:
    raise ValueError(f"config.sft.target={target!r}: choose from {tuple(TARGETS)}")
  return TARGETS[target](example)


def collect(ctx: base.Context, model, batch: dict, step: int):
  """Reference responses (config.sft.target) followed by EOS, cut to rollout.max_new_tokens."""
  del model, step
  config, length = ctx.config, ctx.config.rollout.max_new_tokens
  prompts = base.step_prompts(ctx, batch)
  responses = np.zeros((len(prompts), length), np.int32)  # [B, L]
  mask = np.zeros((len(prompts), length), bool)  # [B, L]
  for i, ex in enumerate(batch["examples"]):
    text = target_text(ex, config.sft.target)
    ids = ctx.tokenizer.encode(text, add_special_tokens=False) + list(ctx.eos_ids[:1])
    ids = ids[:length]
    responses[i, : len(ids)], mask[i, : len(ids)] = ids, True
  out = SFTBatch(seq=base.pack(prompts, responses, mask, config.max_prompt_len))
  metrics = {"sft/response_len": float(mask.sum(1).mean())}
  timings = dict(rollout=0.0, teacher_wait=0.0, scoring=0.0)
  return base.done(base.Collected(out, metrics, [], timings))


def sft_loss(
  logits, targets, token_mask, *, reduction: str = "token_mean", norm_constant: float | None = None,
  totals=None,
) -> tuple[jax.Array, dict]:  # fmt: skip
  """Masked cross-entropy: x_bt = -log p(y_bt) over tokens with token_mask, then `masked_reduce`
  (with a packed batch's global `totals`).

  Returns:
    (loss, aux): loss/nll_token_mean (mean NLL per token whatever the reduction).
  """
  mask = token_mask.astype(bool)
  nll = -losses.token_logprobs(logits, targets)  # [B, T]
  return losses.masked_reduce(nll, mask, reduction, norm_constant, totals), {
    "loss/nll_token_mean": losses.masked_mean(nll, mask)
  }


def loss(config, logits, batch: SFTBatch, base_logits=None, teacher_logits=None):
  """(loss, aux) of one (micro-)batch; logits [B, L, V] predict batch.seq.response_tokens."""
  del config, base_logits, teacher_logits
  return sft_loss(logits, batch.seq.response_tokens, batch.seq.response_mask)


def packed_loss(config, logits, batch: packing.PackedBatch, base_logits=None, teacher_logits=None):
  """`loss` of a packed (micro-)batch; logits [R, S, V] (or HeadStats) predict batch.targets."""
  del config, base_logits, teacher_logits
  return sft_loss(logits, batch.targets, batch.loss_mask, totals=packing.totals(batch))


def abstract_batch(config, rows: int, prompt_len: int, length: int) -> SFTBatch:
  del config
  return SFTBatch(base.abstract_sequences(rows, prompt_len, length))


METHOD = base.Method(
  name="sft", collect=collect, loss=loss, abstract_batch=abstract_batch, packed_loss=packed_loss
)
