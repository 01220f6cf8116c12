"""The functional, sharded train step: `update(state, base_params, batch) -> (state, metrics)`.

One jitted function serves every method (`config.method`, methods.registry): the method's typed
batch goes in, its loss comes from its module; the method is static, so it compiles once. The state is donated; the frozen base parameters are an argument
(same sharding, never donated, never a closed-over constant: a constant would be baked into the
compiled program and copied on every compile).
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from omniopd_jax import sharding
from omniopd_jax.methods import base, registry


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


def response_logits(graphdef, params, seq: base.Sequences, remat: bool = False) -> jax.Array:
  """Logits predicting each response token: [B, L, V] float32 (the dense path).

  seq.tokens is [B, P + L] (left-padded prompt then response). Position P - 1 + i predicts
  response token i; the LM head is applied to those L positions only.
  """
  model = nnx.merge(graphdef, params)
  tokens, mask = seq.tokens, seq.attention_mask
  length = seq.response_mask.shape[1]
  hidden = model.hidden_states(tokens[:, :-1], mask[:, :-1], remat=remat)  # [B, P + L - 1, E]
  return model.logits(hidden[:, -length:])  # [B, L, V]


def make_loss_fn(config, method: base.Method, graphdef, teacher_graphdef=None):
  """loss_fn(params, base_params, teacher_params, batch) -> (loss, aux) of one (micro-)batch.

  The dense loss path, in one place: full [B, L, V] logits of the student (and, when the method
  asks, of the frozen base and the in-process teacher, without gradient), then the method's loss.
  """
  use_base = method.needs_base(config)
  use_teacher = method.needs_teacher_logits(config)
  remat = bool(getattr(getattr(config, "model", None), "remat", False))
  teacher_graphdef = graphdef if teacher_graphdef is None else teacher_graphdef

  def loss_fn(params, base_params, teacher_params, batch):
    logits = response_logits(graphdef, params, batch.seq, remat=remat)  # [b, L, V]
    base_logits = teacher_logits = None
    if use_base:
      base_logits = jax.lax.stop_gradient(response_logits(graphdef, base_params, batch.seq))
    if use_teacher:
      teacher_logits = jax.lax.stop_gradient(
        response_logits(teacher_graphdef, teacher_params, batch.seq)
      )
    return method.loss(config, logits, batch, base_logits, teacher_logits)

  return loss_fn


def needs_base(config) -> bool:
  """Whether config.method's loss reads the frozen base's logits (its KL anchor)."""
  return registry.get(config.method).needs_base(config)


def make_accumulate_fn(grad_fn, micro: int):
  """grad_fn over `micro` micro-batches, averaged: the same (loss, aux), grads signature."""

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

  return accumulate


def make_update_fn(
  config,
  mesh,
  graphdef,
  abstract_state: TrainState,
  rules=sharding.DEFAULT_RULES,
  teacher_graphdef=None,
):
  """One jitted update for `config.method` (methods.registry).

  Returns `update(state, base_params, batch, teacher_params=None) -> (state, metrics)`; batch is
  the method's typed batch (e.g. methods.omniopd.OmniOPDBatch) of [B, ...] arrays, numpy rows of
  this process or global arrays sharded over the batch axes. `teacher_params` is only used by
  `opd` with the full-vocabulary estimator (same-tokenizer teacher in process), whose
  architecture is `teacher_graphdef` (default: the student's).
  """
  method = registry.get(config.method)
  tx = make_optimizer(config.optimizer, config.num_steps)
  micro = max(int(config.micro_batches), 1)
  loss_fn = make_loss_fn(config, method, graphdef, teacher_graphdef)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  accumulate = make_accumulate_fn(grad_fn, micro)

  def update(state: TrainState, base_params, batch, teacher_params=None):
    batch = method.prepare_batch(config, batch)  # the global batch, before any micro-split
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
  jitted = jax.jit(update, donate_argnums=0, out_shardings=(shardings, None))

  def call(state, base_params, batch, teacher_params=None):
    if _is_host(batch):  # this process's rows -> one global batch (any number of processes)
      batch = jax.tree.map(lambda x: sharding.global_batch(x, mesh, rules), batch)
    return jitted(state, base_params, batch, teacher_params)

  call.jitted = jitted
  call.shardings = shardings
  call.base_shardings = shardings.params
  call.tx = tx
  return call


def _is_host(batch) -> bool:
  return any(not isinstance(x, jax.Array) for x in jax.tree.leaves(batch))
