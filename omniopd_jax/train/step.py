"""The functional, sharded train step: `update(state, base_params, batch) -> (state, metrics)`.

One jitted function serves every method (`config.method` in omniopd | opd | grpo | sft); the method
is static, so it compiles once. The state is donated; the frozen base parameters are an argument
(same sharding, never donated, never a closed-over constant: a constant would be baked into the
compiled program and copied on every compile).
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from omniopd_jax import sharding
from omniopd_jax.methods import losses
from omniopd_jax.models import lm
from omniopd_jax.ops import vocab_tiling

METHODS = ("omniopd", "opd", "grpo", "sft")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  params: Any  # nnx.State of the student's nnx.Param variables
  opt_state: Any
  rng: jax.Array  # [2] uint32 raw key data (checkpointable)


def make_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay to learning_rate * min_lr_ratio, clipped."""
  peak = opt_cfg.learning_rate
  warmup = max(int(opt_cfg.warmup_steps), 0)
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0 if warmup else peak,
    peak_value=peak,
    warmup_steps=warmup,
    decay_steps=max(num_steps, warmup + 1),
    end_value=peak * opt_cfg.min_lr_ratio,
  )
  adamw = optax.adamw(
    schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay, eps=1e-8
  )
  if opt_cfg.grad_clip and opt_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), adamw)
  return adamw


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(seed)),
  )


def state_shardings(abstract_state: TrainState, mesh, rules=sharding.DEFAULT_RULES):
  """Parameters and their optimizer moments follow the logical axes; everything else replicated.

  Optimizer leaves shaped like a parameter take that parameter's sharding (Adam's mu and nu).
  """
  param_shardings = sharding.variable_shardings(abstract_state.params, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  by_shape: dict = {}
  for leaf, s in zip(jax.tree.leaves(abstract_state.params), jax.tree.leaves(param_shardings)):
    by_shape.setdefault((leaf.shape, str(leaf.dtype)), s)
  opt = jax.tree.map(
    lambda x: by_shape.get((x.shape, str(x.dtype)), replicated) if x.ndim else replicated,
    abstract_state.opt_state,
  )
  return TrainState(step=replicated, params=param_shardings, opt_state=opt, rng=replicated)


def response_hidden(graphdef, params, batch, remat=False, attention="dense", constrain=None):
  """(final hidden states predicting each response token [B, L, E], the merged model).

  batch["tokens"] is [B, P + L] (left-padded prompt then response). Position P - 1 + i predicts
  response token i.
  """
  model = nnx.merge(graphdef, params)
  tokens, mask = batch["tokens"], batch["attention_mask"]
  length = batch["response_mask"].shape[1]
  hidden = model.hidden_states(
    tokens[:, :-1], mask[:, :-1], remat=remat, attention=attention, constrain=constrain
  )  # [B, P + L - 1, E]
  return hidden[:, -length:], model


def response_logits(
  graphdef, params, batch, remat=False, attention="dense", constrain=None
) -> jax.Array:
  """Logits predicting each response token: [B, L, V] float32 (the LM head on those L only)."""
  hidden, model = response_hidden(graphdef, params, batch, remat, attention, constrain)
  return model.logits(hidden)  # [B, L, V]


def response_stats(
  model_cfg, graphdef, params, batch, base_params=None, teacher=None, mesh=None,
  rules=sharding.DEFAULT_RULES,
):  # fmt: skip
  """Per-token log-probs, entropy and KLs [B, L] from the vocabulary-tiled head (ops/).

  No [B, L, V] array exists in the forward or the backward pass. The frozen base (and the
  in-process teacher, `teacher` = (graphdef, params)) run their trunks to hidden states without
  gradient; their heads are recomputed tile by tile beside the student's. With a `mesh`, rows
  stay split over the batch axes and the head gradient keeps the head's own sharding.
  """
  remat = bool(model_cfg.get("remat", False))
  attention = model_cfg.get("attention", "dense")
  rows = head_sharding = None
  if mesh is not None:
    rows = lambda x: jax.lax.with_sharding_constraint(
      x, sharding.batch_sharding(mesh, x.ndim, rules)
    )

  def head(graphdef, params, remat=False):
    hidden, model = response_hidden(graphdef, params, batch, remat, attention, rows)
    return vocab_tiling.Head(hidden, *lm.head_weights(model))

  frozen = lambda g, p: None if p is None else head(g, p)  # head_stats stops their gradient
  student = head(graphdef, params, remat)
  if mesh is not None:  # the student head's gradient keeps the parameter's sharding
    axes = ("vocab", "embed") if student.layout == "ve" else ("embed", "vocab")
    spec = sharding.logical_to_spec(axes, student.weights.shape, mesh, rules)
    named = jax.sharding.NamedSharding(mesh, spec)
    head_sharding = lambda w: jax.lax.with_sharding_constraint(w, named)
  return vocab_tiling.head_stats(
    student, batch["response_tokens"],
    base=frozen(graphdef, base_params), teacher=None if teacher is None else frozen(*teacher),
    vocab_tile=int(model_cfg.get("head_vocab_tile", 0)) or None,
    constrain_rows=rows, constrain_head=head_sharding,
  )  # fmt: skip


def method_loss(config, logits, base_logits, teacher_logits, batch):
  """(loss, aux) of `config.method` on one (micro-)batch."""
  targets = batch["response_tokens"]  # [B, L]
  mask = batch["response_mask"]  # [B, L]
  length = targets.shape[1]
  norm = config.omniopd.norm_constant or length
  if config.method == "omniopd":
    o = config.omniopd
    token_weight, audited = losses.chunk_token_weights(
      batch["fork_starts"], batch["fork_mask"], batch["fork_weight"], o.chunk_len, length
    )  # [B, L] each
    return losses.omniopd_loss(
      logits, base_logits, targets, mask, token_weight, audited,
      beta=o.beta, reduction=o.reduction, norm_constant=norm, kl_anchor=o.kl_anchor,
    )  # fmt: skip
  if config.method == "opd":
    if config.opd.estimator == "full_vocab":
      return losses.opd_full_kl_loss(logits, teacher_logits, mask, norm_constant=norm)
    return losses.opd_sampled_loss(
      logits, targets, batch["teacher_logprobs"], mask, norm_constant=norm
    )
  if config.method == "grpo":
    return losses.grpo_loss(
      logits, batch["old_logprobs"], targets, mask, batch["advantages"],
      base_logits=base_logits, beta=config.grpo.beta, clip_eps=config.grpo.clip_eps,
      norm_constant=norm, kl_anchor=config.grpo.beta > 0,
    )  # fmt: skip
  if config.method == "sft":
    return losses.sft_loss(logits, targets, mask)
  raise ValueError(f"config.method={config.method!r}: choose from {METHODS}")


def center_fork_weights(batch: dict) -> dict:
  """The `centered` weight form: pi_hat minus its mean over the audited forks of the global batch.

  Done on device so that every process and micro-batch sees the same (global) mean.
  """
  mask = batch["fork_mask"].astype(jnp.float32)  # [B, M]
  weight = batch["fork_weight"].astype(jnp.float32)  # [B, M] pi_hat
  mean = (weight * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return {**batch, "fork_weight": (weight - mean) * mask}


def needs_base(config) -> bool:
  if config.method == "omniopd":
    return bool(config.omniopd.kl_anchor)
  return config.method == "grpo" and config.grpo.beta > 0


def make_update_fn(
  config,
  mesh,
  graphdef,
  abstract_state: TrainState,
  rules=sharding.DEFAULT_RULES,
  teacher_graphdef=None,
):
  """One jitted update for `config.method`.

  Returns `update(state, base_params, batch, teacher_params=None) -> (state, metrics)`; batch is a
  dict of [B, ...] arrays sharded over the batch axes. `teacher_params` is only used by
  `opd` with the full-vocabulary estimator (same-tokenizer teacher in process), whose
  architecture is `teacher_graphdef` (default: the student's).
  """
  if config.method not in METHODS:
    raise ValueError(f"config.method={config.method!r}: choose from {METHODS}")
  tx = make_optimizer(config.optimizer, config.num_steps)
  micro = max(int(config.micro_batches), 1)
  use_base = needs_base(config)
  use_teacher = config.method == "opd" and config.opd.estimator == "full_vocab"
  teacher_graphdef = graphdef if teacher_graphdef is None else teacher_graphdef

  model_cfg = config.get("model", {})
  tiled = model_cfg.get("head", "dense") == "tiled"
  rows = sharding.batch_sharding(mesh, 3, rules)  # activations [B, T, E]: rows over batch axes
  constrain = lambda x: jax.lax.with_sharding_constraint(x, rows)  # see CausalLM.hidden_states

  def loss_fn(params, base_params, teacher_params, batch):
    if tiled:  # per-token statistics [b, L]; the losses read them in place of logits
      teacher = (teacher_graphdef, teacher_params) if use_teacher else None
      base = base_params if use_base else None
      stats = response_stats(model_cfg, graphdef, params, batch, base, teacher, mesh, rules)
      return method_loss(
        config, stats, stats if use_base else None, stats if use_teacher else None, batch
      )
    remat = bool(model_cfg.get("remat", False))
    attention = model_cfg.get("attention", "dense")
    logits = response_logits(graphdef, params, batch, remat, attention, constrain)  # [b, L, V]
    base_logits = teacher_logits = None
    if use_base:
      base_logits = jax.lax.stop_gradient(
        response_logits(graphdef, base_params, batch, attention=attention, constrain=constrain)
      )
    if use_teacher:
      teacher_logits = jax.lax.stop_gradient(
        response_logits(
          teacher_graphdef,
          teacher_params,
          batch,
          attention=attention,
          constrain=constrain,
        )
      )
    loss, aux = method_loss(config, logits, base_logits, teacher_logits, batch)
    return loss, aux

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(params, base_params, teacher_params, batch):
    if micro == 1:
      return grad_fn(params, base_params, teacher_params, batch)
    # Strided split: row r goes to micro-batch r % micro, so every micro-batch keeps rows on
    # every device of the batch axes (a contiguous split would idle most of them).
    split = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1), batch
    )

    def body(carry, mb):
      (loss, aux), grads = grad_fn(params, base_params, teacher_params, mb)
      return jax.tree.map(jnp.add, carry, ((loss, aux), grads)), None

    zero = jax.eval_shape(
      lambda: grad_fn(params, base_params, teacher_params, jax.tree.map(lambda x: x[0], split))
    )
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zero)
    total, _ = jax.lax.scan(body, zero, split)
    return jax.tree.map(lambda x: x / micro, total)

  def update(state: TrainState, base_params, batch, teacher_params=None):
    if config.method == "omniopd" and config.omniopd.weight_form == "centered":
      batch = center_fork_weights(batch)  # over the global batch, before any micro-batch split
    (loss, aux), grads = accumulate(state.params, base_params, teacher_params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "train/loss": loss,
      "train/grad_norm": optax.global_norm(grads),
      "train/param_norm": optax.global_norm(params),
      "train/update_norm": optax.global_norm(updates),
      **{f"train/{k}" if "/" not in k else k: v for k, v in aux.items()},
    }
    if "loss/kl_anchor" in aux:
      metrics["train/kl"] = aux.get("kl/unaudited_mean", aux.get("kl/mean", 0.0))
    # A non-finite loss leaves the state untouched, so the last good parameters survive.
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics["train/grad_norm"])
    metrics["train/loss_finite"] = finite
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    return new_state, metrics

  shardings = state_shardings(abstract_state, mesh, rules)
  base_shardings = shardings.params
  batch_sharding = sharding.batch_sharding(mesh, 1, rules).spec[0]

  def batch_shardings(batch):
    return jax.tree.map(
      lambda x: jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(batch_sharding, *([None] * (x.ndim - 1)))
      ),
      batch,
    )

  jitted = jax.jit(update, donate_argnums=0, out_shardings=(shardings, None))

  def call(state, base_params, batch, teacher_params=None):
    if _is_host(batch):  # this process's rows -> one global batch (any number of processes)
      batch = jax.tree.map(
        lambda x, sh: jax.make_array_from_process_local_data(sh, np.asarray(x)),
        batch,
        batch_shardings(batch),
      )
    return jitted(state, base_params, batch, teacher_params)

  call.jitted = jitted
  call.shardings = shardings
  call.base_shardings = base_shardings
  call.tx = tx
  return call


def _is_host(batch) -> bool:
  return any(not isinstance(x, jax.Array) for x in jax.tree.leaves(batch))
