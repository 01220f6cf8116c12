"""What every training method shares: the method interface, the typed token batch, and the host
helpers of collection (prompt truncation, packing, rollouts, stable seeds).

A method is one module under methods/ (omniopd, opd, grpo, sft) that builds a `Method`: its
host-side collection (rollouts -> the method's signal -> its typed batch) and its pure loss.
methods/registry.py maps `config.method` to it.
"""

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from omniopd_jax.data import prompts as prompts_lib
from omniopd_jax.rollout import continuous, sampler


@flax.struct.dataclass
class Sequences:
  """Prompt + response tokens, the part of the batch every method has.

  P = config.max_prompt_len (prompts left-padded to it), L = the response length.
  """

  tokens: Any  # [B, P + L] int32: left-padded prompt, then the response
  attention_mask: Any  # [B, P + L] bool
  response_tokens: Any  # [B, L] int32 (0 past the response)
  response_mask: Any  # [B, L] bool: the tokens that count in the loss


@dataclasses.dataclass
class Collected:
  """One step's collection, ready for the update."""

  batch: Any  # the method's typed batch (numpy leaves) for train.step's update
  metrics: dict[str, float]  # host metrics of this step
  texts: list[dict]  # a few human-readable samples
  timings: dict[str, float]  # seconds: rollout, teacher_wait, scoring (, teacher_span)
  teacher_samples: tuple[int, int] = (0, 0)  # (asked, failed) teacher samples of this step


@dataclasses.dataclass(frozen=True)
class Context:
  """What collectors need on the host; built once by train.setup."""

  config: Any
  tokenizer: Any
  eos_ids: tuple[int, ...]
  rules: tuple  # logical-axis sharding rules (sharding.rules_from_config)
  rollout_mesh: Any
  process_index: int
  teacher: Any = None  # teacher.client.TeacherClient (methods with teacher="api")
  scorer: Any = None  # reward.similarity scorer (teacher="api")
  backend: str = ""  # config.teacher.backend
  teacher_logprobs_fn: Any = None  # Sequences -> [B, L] teacher log-probs (teacher="model")
  stop_requested: Any = None  # threading.Event (SIGTERM): waits raise WaitCancelled when set


class WaitCancelled(Exception):
  """A collection's wait for the teacher gave up because a stop was requested."""


# collect(ctx, model, prompt_batch, step) -> finish; finish() -> Collected. `collect` does all
# device work with `model` (whose buffers the next update may donate); finish() is host work only.
Collector = Callable[[Context, Any, dict, int], Callable[[], Collected]]
# loss(config, logits [B, L, V], batch, base_logits, teacher_logits) -> (loss, aux scalars).
Loss = Callable[..., tuple[Any, dict]]
# abstract_batch(config, rows, prompt_len, length) -> the typed batch of jax.ShapeDtypeStructs.
AbstractBatch = Callable[[Any, int, int, int], Any]


def _never(config) -> bool:
  del config
  return False


def _one(config) -> int:
  del config
  return 1


def _unchanged(config, batch):
  del config
  return batch


def _no_fields(config, batch) -> dict:
  del config, batch
  return {}


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method: how a step's batch is collected and what loss it trains."""

  name: str
  collect: Collector
  loss: Loss
  abstract_batch: AbstractBatch  # shapes of its batch (tools.plan, compile checks)
  # The teacher it needs: "" none | "api" a text API (TeacherClient + scorer) | "model" a
  # same-tokenizer model in process.
  teacher: str = ""
  needs_base: Callable[[Any], bool] = _never  # frozen-base logits (the KL anchor)
  needs_teacher_logits: Callable[[Any], bool] = _never  # the in-process teacher's logits
  # Device-side preparation of the global batch before any micro-batch split.
  prepare_batch: Callable[[Any, Any], Any] = _unchanged
  samples_per_prompt: Callable[[Any], int] = _one  # rows of the batch per prompt
  # Packed updates (config.pack_sequences, methods/packing.py): the batch's per-row signal as
  # per-token fields (host: name -> [B, L] per response token or [B] per row, numpy), the loss
  # of a PackedBatch (same signature as `loss`), and its device-side preparation.
  token_fields: Callable[[Any, Any], dict] = _no_fields
  packed_loss: Loss | None = None
  prepare_packed: Callable[[Any, Any], Any] = _unchanged


def abstract_sequences(rows: int, prompt_len: int, length: int) -> Sequences:
  """Sequences of jax.ShapeDtypeStructs: [rows, prompt_len + length] tokens, [rows, length]."""
  s = jax.ShapeDtypeStruct
  return Sequences(
    tokens=s((rows, prompt_len + length), jnp.int32),
    attention_mask=s((rows, prompt_len + length), jnp.bool_),
    response_tokens=s((rows, length), jnp.int32),
    response_mask=s((rows, length), jnp.bool_),
  )


def stable_seed(*parts) -> int:
  """A 31-bit seed from any values: the same inputs give the same seed in every process."""
  digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") & 0x7FFFFFFF


def pack(prompts, responses: np.ndarray, response_mask: np.ndarray, prompt_len: int) -> Sequences:
  """Sequences [B, P + L] from ragged prompts and [B, L] responses (numpy)."""
  b, length = responses.shape
  tokens = np.zeros((b, prompt_len + length), np.int32)
  mask = np.zeros((b, prompt_len + length), bool)
  for i, p in enumerate(prompts):
    tokens[i, prompt_len - len(p) : prompt_len] = p
    mask[i, prompt_len - len(p) : prompt_len] = True
  tokens[:, prompt_len:] = np.where(response_mask, responses, 0)
  mask[:, prompt_len:] = response_mask
  return Sequences(
    tokens=tokens,
    attention_mask=mask,
    response_tokens=tokens[:, prompt_len:],
    response_mask=response_mask.astype(bool),
  )


def rollout(
  ctx: Context, model, prompts, step: int, num_samples: int = 1, on_row_done=None
) -> sampler.Rollout:
  """The student's samples for this step's prompts (config.rollout settings); `on_row_done` as
  in `sampler.generate`."""
  config = ctx.config
  r = config.rollout
  return sampler.generate(
    model, prompts, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
    top_k=r.top_k, seed=stable_seed(config.seed, step, "rollout", ctx.process_index),
    eos_ids=ctx.eos_ids, num_samples=num_samples, mesh=ctx.rollout_mesh, rules=ctx.rules,
    prompt_len=config.max_prompt_len,  # one static shape per run (and across processes)
    engine=r.engine, engine_options=continuous.EngineOptions.from_config(r),
    decode_layout=r.decode_layout, on_row_done=on_row_done,
  )  # fmt: skip


def step_prompts(ctx: Context, batch: dict) -> list[list[int]]:
  """This step's prompt ids, left-truncated to config.max_prompt_len."""
  return prompts_lib.left_truncate(batch["prompt_ids"], ctx.config.max_prompt_len)[0]


def done(got: Collected) -> Callable[[], Collected]:
  """A finish() for collections that need no waiting."""
  return lambda: got
