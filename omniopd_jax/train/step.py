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
import numpy as np
import optax
from flax import nnx

from omniopd_jax import sharding
from omniopd_jax.methods import base, packing, registry
from omniopd_jax.models import layer_scan, lm
from omniopd_jax.ops import attention as attention_ops
from omniopd_jax.ops import vocab_tiling


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


def packed_attention(attention: str) -> str:
  """The training attention for packed rows: one with segment ids. "auto" picks blockwise on
  every backend: cuDNN's path takes one contiguous span per row, and the Pallas kernels see one
  device's rows (ops/attention.py), where blockwise is pure JAX that GSPMD partitions."""
  if attention == "auto":
    return "blockwise"
  if attention_ops.resolve(attention) in ("xla", "cudnn"):
    raise ValueError(
      f"model.attention={attention!r} takes one contiguous span of tokens per row; packed "
      "sequences (pack_sequences=True) need segment ids: auto, dense, blockwise, splash or "
      "pallas_gpu"
    )
  return attention


def response_hidden(graphdef, params, seq, remat=False, attention="dense", constrain=None,
                    mlp_chunk=0, layer_chunk=0):  # fmt: skip
  """(final hidden states predicting each response token [B, L, E], the merged model).

  seq.tokens is [B, P + L] (left-padded prompt then response). Position P - 1 + i predicts
  response token i. A packing.PackedBatch instead gives [R, S, E] over every packed position
  (position j predicts seq.targets[:, j]), each sequence attending within its segment only.
  """
  model = nnx.merge(graphdef, params)
  if isinstance(seq, packing.PackedBatch):
    hidden = model.hidden_states(
      seq.tokens, seq.segment_ids > 0, seq.positions, remat=remat,
      attention=packed_attention(attention), segment_ids=seq.segment_ids, constrain=constrain,
      mlp_chunk=mlp_chunk, layer_chunk=layer_chunk,
    )  # fmt: skip
    return hidden, model
  tokens, mask = seq.tokens, seq.attention_mask
  length = seq.response_mask.shape[1]
  hidden = model.hidden_states(
    tokens[:, :-1],
    mask[:, :-1],
    remat=remat,
    attention=attention,
    constrain=constrain,
    mlp_chunk=mlp_chunk,
    layer_chunk=layer_chunk,
  )  # [B, P + L - 1, E]
  return hidden[:, -length:], model


def response_logits(graphdef, params, seq, remat=False, attention="dense", constrain=None,
                    mlp_chunk=0, layer_chunk=0) -> jax.Array:  # fmt: skip
  """Logits predicting each response token: [B, L, V] float32 (the dense path; the LM head on
  those L positions only)."""
  hidden, model = response_hidden(
    graphdef, params, seq, remat, attention, constrain, mlp_chunk, layer_chunk
  )
  return model.logits(hidden)  # [B, L, V]


def response_stats(
  model_cfg, graphdef, params, seq, base_params=None, teacher=None, mesh=None,
  rules=sharding.DEFAULT_RULES,
):  # fmt: skip
  """Per-token log-probs, entropy and KLs [B, L] from the vocabulary-tiled head (ops/); for a
  packing.PackedBatch, [R, S] over its packed positions.

  No [B, L, V] array exists in the forward or the backward pass. The frozen base (and the
  in-process teacher, `teacher` = (graphdef, params)) run their trunks to hidden states without
  gradient; their heads are recomputed tile by tile beside the student's. With a `mesh`, rows
  stay split over the batch axes and the head gradient keeps the head's own sharding.
  """
  remat = layer_scan.remat_policy(model_cfg.get("remat", False))
  attention = model_cfg.get("attention", "dense")
  chunks = _chunks(model_cfg)
  rows = head_sharding = None
  if mesh is not None:
    rows = lambda x: jax.lax.with_sharding_constraint(
      x, sharding.batch_sharding(mesh, x.ndim, rules)
    )

  def head(graphdef, params, remat=False):
    hidden, model = response_hidden(graphdef, params, seq, remat, attention, rows, *chunks)
    return vocab_tiling.Head(hidden, *lm.head_weights(model))

  frozen = lambda g, p: None if p is None else head(g, p)  # head_stats stops their gradient
  student = head(graphdef, params, remat)
  if mesh is not None:  # the student head's gradient keeps the parameter's sharding
    axes = ("vocab", "embed") if student.layout == "ve" else ("embed", "vocab")
    spec = sharding.logical_to_spec(axes, student.weights.shape, mesh, rules)
    named = jax.sharding.NamedSharding(mesh, spec)
    head_sharding = lambda w: jax.lax.with_sharding_constraint(w, named)
  targets = seq.targets if isinstance(seq, packing.PackedBatch) else seq.response_tokens
  return vocab_tiling.head_stats(
    student, targets,
    base=frozen(graphdef, base_params), teacher=None if teacher is None else frozen(*teacher),
    vocab_tile=int(model_cfg.get("head_vocab_tile", 0)) or None,
    constrain_rows=rows, constrain_head=head_sharding,
  )  # fmt: skip


def make_loss_fn(config, method: base.Method, graphdef, teacher_graphdef=None, mesh=None,
                 rules=sharding.DEFAULT_RULES):  # fmt: skip
  """loss_fn(params, base_params, teacher_params, batch) -> (loss, aux) of one (micro-)batch.

  The one place logits are made. `model.head="tiled"`: per-token statistics from the
  vocabulary-tiled head (response_stats), which the losses read in place of logits; "dense": full
  [B, L, V] logits of the student (and, when the method asks, of the frozen base and the
  in-process teacher, without gradient). Then the method's loss.
  """
  use_base = method.needs_base(config)
  use_teacher = method.needs_teacher_logits(config)
  model_cfg = config.get("model", {})
  remat = layer_scan.remat_policy(model_cfg.get("remat", False))
  attention = model_cfg.get("attention", "dense")
  tiled = model_cfg.get("head", "dense") == "tiled"
  chunks = _chunks(model_cfg)
  teacher_graphdef = graphdef if teacher_graphdef is None else teacher_graphdef
  constrain = None
  if mesh is not None:
    # Activations [B, T, E] keep their rows over the batch axes: left to itself, GSPMD follows the
    # embedding's fsdp sharding and every device computes every row.
    rows = sharding.batch_sharding(mesh, 3, rules)
    constrain = lambda x: jax.lax.with_sharding_constraint(x, rows)

  def loss_fn(params, base_params, teacher_params, batch):
    packed = isinstance(batch, packing.PackedBatch)  # rows packed end to end (methods/packing)
    seq = batch if packed else batch.seq
    loss = method.packed_loss if packed else method.loss
    if loss is None:
      raise ValueError(f"method {method.name!r} has no packed loss: set pack_sequences=False")
    if tiled:  # per-token statistics [b, L]; the losses read them in place of logits
      teacher = (teacher_graphdef, teacher_params) if use_teacher else None
      base_p = base_params if use_base else None
      stats = response_stats(model_cfg, graphdef, params, seq, base_p, teacher, mesh, rules)
      return loss(config, stats, batch, stats if use_base else None, stats if use_teacher else None)
    dense = lambda g, p, r=False: response_logits(g, p, seq, r, attention, constrain, *chunks)
    logits = dense(graphdef, params, remat)  # [b, L, V]
    base_logits = teacher_logits = None
    if use_base:
      base_logits = jax.lax.stop_gradient(dense(graphdef, base_params))
    if use_teacher:
      teacher_logits = jax.lax.stop_gradient(dense(teacher_graphdef, teacher_params))
    return loss(config, logits, batch, base_logits, teacher_logits)

  return loss_fn


def _chunks(model_cfg) -> tuple[int, int]:
  """(model.mlp_chunk, model.layer_chunk): tokens per rematerialised chunk, 0 = off."""
  return int(model_cfg.get("mlp_chunk", 0)), int(model_cfg.get("layer_chunk", 0))


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
  this process or global arrays sharded over the batch axes. With `config.pack_sequences` a host
  batch is first packed (methods/packing.py: rows end to end in `pack_tokens`-token rows, as many
  micro-batches as they need, bucketed so a run compiles a few shapes); a PackedBatch is taken as
  it is. `teacher_params` is only used by `opd` with the full-vocabulary estimator
  (same-tokenizer teacher in process), whose architecture is `teacher_graphdef` (default: the
  student's).
  """
  method = registry.get(config.method)
  tx = make_optimizer(config.optimizer, config.num_steps)
  micro = max(int(config.micro_batches), 1)
  loss_fn = make_loss_fn(config, method, graphdef, teacher_graphdef, mesh, rules)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  accumulate = make_accumulate_fn(grad_fn, micro)

  def update(state: TrainState, base_params, batch, teacher_params=None):
    # The global batch, before any micro-split (a packed batch also gets its global totals).
    if isinstance(batch, packing.PackedBatch):  # as many micro-batches as its rows need
      batch = packing.with_totals(method.prepare_packed(config, batch))
      accumulated = make_accumulate_fn(grad_fn, batch.micro_batches)
    else:
      batch, accumulated = method.prepare_batch(config, batch), accumulate
    (loss, aux), grads = accumulated(state.params, base_params, teacher_params, batch)
    grad_norm = optax.global_norm(grads)
    # A non-finite loss leaves the state untouched, so the last good parameters survive. A cond
    # (not a select over two whole states) lets the optimizer write the new state in place.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def step(_):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
      return new, optax.global_norm(updates)

    def skip(_):
      return state, jnp.full((), jnp.nan, jnp.float32)

    new_state, update_norm = jax.lax.cond(finite, step, skip, None)
    metrics = {
      "train/loss": loss,
      "train/grad_norm": grad_norm,
      "train/param_norm": optax.global_norm(new_state.params),
      "train/update_norm": update_norm,
      "train/loss_finite": finite,
      **{f"train/{k}" if "/" not in k else k: v for k, v in aux.items()},
    }
    if "loss/kl_anchor" in aux:
      metrics["train/kl"] = aux.get("kl/unaudited_mean", aux.get("kl/mean", 0.0))
    return new_state, metrics

  def update_in_mesh(*args):
    # The mesh is known while tracing: Pallas attention kernels then run per shard (GSPMD cannot
    # split a custom call; ops.attention.per_shard).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return update(*args)

  shardings = state_shardings(abstract_state, mesh, rules)
  jitted = jax.jit(update_in_mesh, donate_argnums=0, out_shardings=(shardings, None))

  pack = bool(config.get("pack_sequences", False))

  def call(state, base_params, batch, teacher_params=None):
    packed = {}  # host metrics of the packing (this process's rows)
    if pack and not isinstance(batch, packing.PackedBatch):  # this process's rows, end to end
      if not _is_host(batch):
        raise ValueError("pack_sequences=True packs on the host: pass the collected numpy batch")
      padded = batch.seq.tokens.size
      batch = packing.pack_for_update(config, method, batch, mesh, rules)
      packed = {
        "pack/rows": float(batch.tokens.shape[0]),
        "pack/micro_batches": float(batch.micro_batches),
        "pack/padding_frac": float(np.mean(batch.segment_ids == 0)),
        "pack/tokens_vs_padded": batch.tokens.size / padded,  # update tokens, packed / padded
      }
    if _is_host(batch):  # this process's rows -> one global batch (any number of processes)
      batch = jax.tree.map(lambda x: sharding.global_batch(x, mesh, rules), batch)
    state, metrics = jitted(state, base_params, batch, teacher_params)
    return state, {**metrics, **packed}

  call.jitted = jitted
  call.shardings = shardings
  call.base_shardings = shardings.params
  call.tx = tx
  return call


def _is_host(batch) -> bool:
  return any(not isinstance(x, jax.Array) for x in jax.tree.leaves(batch))
