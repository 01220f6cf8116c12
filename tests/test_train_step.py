"""The jitted train step: every method through one function, compile once, sharding, accumulation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omniopd_jax import sharding
from omniopd_jax.configs import math as math_config
from omniopd_jax.methods import base as methods_base
from omniopd_jax.methods import grpo, omniopd, opd, sft
from omniopd_jax.models import lm as model_lib
from omniopd_jax.train import step as train_step

TINY = model_lib.ModelConfig(
  vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
  num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip
B, P, L, M = 8, 5, 12, 2


def make_config(method, **overrides):
  config = math_config.get_config("smoke")
  config.method = method
  config.omniopd.num_forks, config.omniopd.chunk_len = M, 4
  config.num_steps = 10
  config.optimizer.learning_rate = 1e-2
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def make_batch(method="omniopd", seed=0, full_response=False):
  """A random typed batch of `method` (B rows, prompt P, response L)."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, TINY.vocab_size, size=(B, P + L)).astype(np.int32)
  mask = np.ones((B, P + L), bool)
  mask[:, :2] = rng.rand(B, 2) < 0.5  # some left padding
  response_mask = np.arange(L)[None] < rng.randint(4, L + 1, size=(B, 1))
  if full_response:  # equal token counts per micro-batch: means agree exactly
    response_mask[:] = True
  mask[:, P:] = response_mask
  seq = methods_base.Sequences(tokens, mask, tokens[:, P:], response_mask)
  fork_mask, fork_weight = rng.rand(B, M) < 0.7, rng.rand(B, M).astype(np.float32) - 0.3
  teacher_logprobs = -rng.rand(B, L).astype(np.float32)
  old_logprobs = -rng.rand(B, L).astype(np.float32) - 1.0
  advantages = rng.randn(B).astype(np.float32)
  if method == "omniopd":
    starts = np.tile(np.array([[0, 4]], np.int32), (B, 1))
    return omniopd.OmniOPDBatch(seq, starts, fork_mask, fork_weight)
  if method == "opd":
    return opd.OPDBatch(seq, teacher_logprobs)
  if method == "grpo":
    return grpo.GRPOBatch(seq, advantages, old_logprobs)
  return sft.SFTBatch(seq)


def setup(config, mesh, model_cfg=TINY):
  with jax.set_mesh(mesh):
    model = sharding.create_sharded(lambda: model_lib.CausalLM(model_cfg, rngs=nnx.Rngs(0)), mesh)
  graphdef, params = nnx.split(model)
  tx = train_step.make_optimizer(config.optimizer, config.num_steps)
  state = train_step.init_state(params, tx, config.seed)
  update = train_step.make_update_fn(config, mesh, graphdef, jax.eval_shape(lambda: state))
  state = jax.device_put(state, update.shardings)
  base = jax.tree.map(jnp.copy, params)
  return update, state, base, graphdef


@pytest.mark.parametrize("method,extra", [("omniopd", {}), ("opd", {}), ("grpo", {}), ("sft", {}),
                                          ("opd", {"opd.estimator": "full_vocab"})])  # fmt: skip
def test_every_method_updates_and_compiles_once(method, extra):
  config = make_config(method, **extra)
  # The full 3-axis mesh for the main method; a data-only mesh keeps the others quick.
  axes = [("data", 2), ("fsdp", 2), ("tensor", 2)] if method == "omniopd" else [("data", -1)]
  mesh = sharding.make_mesh(axes + [(a, 1) for a in ("fsdp", "tensor") if a not in dict(axes)])
  update, state, base, _ = setup(config, mesh)
  base_before = jax.tree.map(np.asarray, base)
  teacher = base if method == "opd" else None
  traces = []
  original = update.jitted

  first = None
  for step in range(2):
    state, metrics = update(state, base, make_batch(method, step), teacher)
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
    first = first if first is not None else metrics["train/loss"]
    traces.append(original._cache_size())
  assert traces == [1, 1], traces  # one compilation for all steps
  assert int(state.step) == 2
  # The frozen base is an argument: never donated, never changed.
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, np.asarray(b))
  if method == "omniopd":  # parameters stay sharded by their logical axes
    largest = max(jax.tree.leaves(state.params), key=lambda x: x.size)
    assert not largest.sharding.is_fully_replicated


def test_omniopd_zero_weights_and_no_forks_is_pure_kl():
  """With no audited chunk and the student equal to the base, loss and gradient vanish."""
  config = make_config("omniopd")
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  update, state, base, _ = setup(config, mesh)
  batch = make_batch()
  batch.fork_mask[:] = False
  _, metrics = update(state, base, batch)
  assert abs(float(metrics["train/loss"])) < 1e-6
  assert float(metrics["train/grad_norm"]) < 1e-5


def test_micro_batches_match_one_batch():
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  results = []
  for micro in (1, 2):
    config = make_config("sft", micro_batches=micro)
    update, state, base, _ = setup(config, mesh)
    batch = make_batch("sft", full_response=True)
    state, metrics = update(state, base, batch)
    results.append((float(metrics["train/loss"]), jax.tree.map(np.asarray, state.params)))
  assert abs(results[0][0] - results[1][0]) < 1e-5
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_non_finite_loss_keeps_the_last_good_state():
  config = make_config("grpo")
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  update, state, base, _ = setup(config, mesh)
  before = jax.tree.map(np.asarray, state.params)
  batch = make_batch("grpo")
  batch.advantages[0] = np.nan
  state, metrics = update(state, base, batch)
  assert not bool(metrics["train/loss_finite"])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_remat_gives_the_same_update():
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  results = []
  for remat in (False, True):
    config = make_config("omniopd")
    config.model.remat = remat
    update, state, base, _ = setup(config, mesh)
    state, metrics = update(state, base, make_batch())
    results.append((float(metrics["train/loss"]), jax.tree.map(np.asarray, state.params)))
  assert abs(results[0][0] - results[1][0]) < 1e-6
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_scanned_layers_give_the_same_update():
  """Stacked [L, ...] parameters sharded on the 3-axis mesh, a remat policy, one lax.scan: the
  update of the unrolled model (same weights), layer by layer."""
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  results = []
  for scan in (False, True):
    config = make_config("omniopd", **{"model.remat": "dots_except_mlp", "model.scan_layers": scan})
    update, state, base, _ = setup(config, mesh, dataclasses.replace(TINY, scan_layers=scan))
    state, metrics = update(state, base, make_batch())
    results.append((float(metrics["train/loss"]), dict(nnx.to_flat_state(state.params))))
  (loss, unrolled), (scanned_loss, scanned) = results
  assert abs(loss - scanned_loss) < 1e-6
  kernel = scanned[("layers", "mlp", "up_proj", "kernel")][...]  # [L, E, F]
  assert kernel.sharding.spec[:3] == (None, "fsdp", "tensor")
  for path, value in unrolled.items():
    got = (
      scanned[("layers", *path[2:])][...][path[1]] if path[0] == "layers" else scanned[path][...]
    )
    np.testing.assert_allclose(
      np.asarray(got), np.asarray(value[...]), atol=1e-6, err_msg=str(path)
    )
