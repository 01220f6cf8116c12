"""Packed sequences in the update (methods/packing.py): the layout, and loss and gradients equal
to the padded update's for every method."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omniopd_jax import sharding
from omniopd_jax.configs import math as math_config
from omniopd_jax.configs import validate
from omniopd_jax.methods import base, grpo, omniopd, opd, packing, registry, sft
from omniopd_jax.models import lm
from omniopd_jax.train import step as train_step

TINY = lm.ModelConfig(
  vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
  num_attention_heads=4, num_key_value_heads=2, architecture="qwen3", qk_norm=True,
)  # fmt: skip
P, L, M, C = 6, 20, 3, 3
# Response lengths that differ a lot; row 0 (prompt unpadded, response full) is exactly P + L.
LENGTHS = np.array([L, 2, 17, 1, L, 9, 4, 13])
B = len(LENGTHS)


def make_config(method, **overrides):
  config = math_config.get_config("smoke")
  config.method = method
  config.omniopd.update(num_forks=M, chunk_len=C, weight_form="centered")
  config.rollout.max_new_tokens = L
  config.max_prompt_len = P
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def make_batch(method, seed=0, lengths=LENGTHS, token_credit=False):
  """A padded typed batch of `method`: left-padded prompts, responses of `lengths` (OmniOPD with
  `token_credit`: per-token chunk weights and masks too)."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(1, TINY.vocab_size, size=(B, P + L)).astype(np.int32)
  response_mask = np.arange(L)[None] < np.asarray(lengths)[:, None]  # [B, L]
  mask = np.ones((B, P + L), bool)
  mask[1:, : P - 1] = rng.rand(B - 1, P - 1) < 0.4  # ragged left padding (row 0 keeps all)
  mask[:, :P] = np.cumsum(mask[:, :P][:, ::-1], 1)[:, ::-1] == np.arange(P, 0, -1)[None]
  mask[:, P - 1] = True  # every prompt has a token; left padding stays contiguous
  mask[:, P:] = response_mask
  tokens = np.where(mask, tokens, 0)
  seq = base.Sequences(tokens, mask, tokens[:, P:], response_mask)
  if method == "omniopd":
    starts = np.tile(np.array([[0, 5, 12]], np.int32), (B, 1))
    fork_mask = (starts + C <= np.asarray(lengths)[:, None]) & (rng.rand(B, M) < 0.8)
    batch = omniopd.OmniOPDBatch(seq, starts, fork_mask, rng.rand(B, M).astype(np.float32))
    if token_credit:  # each token its own weight; some tokens no sample speaks for
      token_mask = (rng.rand(B, M, C) < 0.7) & fork_mask[..., None]
      token_weight = np.where(token_mask, rng.rand(B, M, C), 0.0).astype(np.float32)
      batch = batch.replace(fork_token_weight=token_weight, fork_token_mask=token_mask)
    return batch
  if method == "opd":
    return opd.OPDBatch(seq, -rng.rand(B, L).astype(np.float32))
  if method == "grpo":
    old = -rng.rand(B, L).astype(np.float32) - 3.0
    return grpo.GRPOBatch(seq, rng.randn(B).astype(np.float32), old)
  return sft.SFTBatch(seq)


def test_layout_restarts_positions_and_keeps_every_token():
  batch = make_batch("grpo")
  fields = registry.get("grpo").token_fields(None, batch)
  packed, where = packing.pack(batch.seq, fields, budget=P + L, unit=2)
  assert packed.tokens.shape == (6, P + L)  # 5 bins (104 tokens), bucketed to a multiple of 2
  for b in range(B):
    k, s, n = where.packed_row[b], where.start[b], where.length[b]
    real = batch.seq.tokens[b][batch.seq.attention_mask[b]]
    np.testing.assert_array_equal(packed.tokens[k, s : s + n], real)
    np.testing.assert_array_equal(packed.positions[k, s : s + n], np.arange(n))
    assert len(set(packed.segment_ids[k, s : s + n])) == 1 and packed.segment_ids[k, s] > 0
    p = n - LENGTHS[b]  # the last prompt token predicts response token 0
    np.testing.assert_array_equal(packed.targets[k, s + p - 1 : s + n - 1], real[p:])
    assert packed.loss_mask[k, s : s + n].sum() == LENGTHS[b] and packed.row_first[k, s + p - 1]
    np.testing.assert_array_equal(packed.fields["advantages"][k, s + p - 1], batch.advantages[b])
  assert packed.loss_mask.sum() == LENGTHS.sum() and packed.row_first.sum() == B
  assert (packed.segment_ids == 0).sum() == packed.tokens.size - where.length.sum()


def test_a_row_over_the_budget_is_a_clear_error():
  batch = make_batch("sft")
  with pytest.raises(ValueError, match=r"row 0 has 26 tokens .* budget of 25"):
    packing.pack(batch.seq, {}, budget=P + L - 1)
  config = make_config("sft", pack_sequences=True, pack_tokens=P + L - 1)
  assert any("pack_tokens=25" in p for p in validate.problems(config))


def test_first_fit_decreasing_and_buckets():
  bins, starts, count = packing.first_fit_decreasing([5, 3, 8, 0, 2, 6], 8)
  assert count == 3 and bins[3] == -1  # 8 alone (exactly the budget), 6+2, 5+3
  assert bins[2] != bins[0] and bins[0] == bins[1] and bins[5] == bins[4]
  assert starts[1] == 5 and starts[4] == 6
  assert [packing.bucket_rows(n, 8) for n in (0, 1, 8, 9, 40, 128, 129, 137)] == [
    8, 8, 8, 16, 40, 128, 144, 144,
  ]  # fmt: skip
  assert packing.bucket_rows(130, 1) == 144  # four significant bits: 9 x 16
  # 37 packed rows on 8 devices: micro-batches of at most 16, 32 or 64 rows (the padded ones).
  assert packing.packed_shape(37, 8, 16) == (3, 16)
  assert packing.packed_shape(37, 8, 32) == (2, 24)
  assert packing.packed_shape(37, 8, 64) == (1, 40)
  assert packing.packed_shape(37, 8) == (1, 40)


def grads_of(config, graphdef, params, base_params, batch, teacher=None):
  method = registry.get(config.method)
  loss_fn = train_step.make_loss_fn(config, method, graphdef)
  if isinstance(batch, packing.PackedBatch):
    batch = packing.with_totals(method.prepare_packed(config, batch))
  else:
    batch = method.prepare_batch(config, batch)
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, aux), grads = grad_fn(params, base_params, teacher, batch)
  return float(loss), aux, jax.tree.leaves(grads)


CASES = [
  ("omniopd", {"model.head": "tiled", "model.attention": "blockwise"}),
  ("omniopd", {"omniopd.token_credit": "decision"}),
  ("opd", {}),
  ("opd", {"opd.estimator": "full_vocab", "model.head": "tiled"}),
  ("grpo", {}),
  ("sft", {}),  # token_mean
]


@pytest.mark.parametrize("method,extra", CASES)
def test_packed_loss_and_gradients_equal_the_padded(method, extra):
  config = make_config(method, **extra)
  graphdef, params = nnx.split(lm.CausalLM(TINY, rngs=nnx.Rngs(0)), nnx.Param)
  # A perturbed copy as the frozen base / teacher: the KL terms are not zero.
  other = jax.tree.map(lambda x: x * 1.1 + 0.01, params)
  teacher = other if method == "opd" else None
  batch = make_batch(method, token_credit="omniopd.token_credit" in extra)
  fields = registry.get(method).token_fields(config, batch)
  packed, _ = packing.pack(batch.seq, fields)
  assert packed.tokens.shape[0] < B  # padding went away

  loss_a, aux_a, g_a = grads_of(config, graphdef, params, other, batch, teacher)
  loss_b, aux_b, g_b = grads_of(config, graphdef, params, other, packed, teacher)
  # Relative to its largest part: the centred policy term and the KL anchor partly cancel.
  parts = [loss_a] + [float(aux_a[k]) for k in ("loss/pg", "loss/kl_anchor") if k in aux_a]
  scale = max(map(abs, parts))
  assert loss_a != 0 and abs(loss_a - loss_b) <= 1e-5 * scale, (loss_a, loss_b)
  for a, b in zip(g_a, g_b, strict=True):
    scale = float(jnp.abs(a).max())
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5 * scale)
  for key in aux_a:  # metrics too (per micro-batch means: equal with one micro-batch)
    np.testing.assert_allclose(float(aux_b[key]), float(aux_a[key]), rtol=1e-5, atol=1e-6)


def test_update_packs_on_the_host_splits_micro_batches_and_compiles_once():
  """make_update_fn with pack_sequences: the host batch is packed (5 rows -> 2 micro-batches of 4
  rows on 2 devices), and gives the padded update's loss; other lengths reuse the compiled shape."""
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 1), ("tensor", 1)], jax.devices()[:2])
  model = lm.CausalLM(TINY, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  base_params = jax.tree.map(lambda x: x * 1.1, params)
  metrics = {}
  for pack, micro in ((False, 1), (True, 2)):
    config = make_config("omniopd", pack_sequences=pack, micro_batches=micro)
    tx = train_step.make_optimizer(config.optimizer, config.num_steps)
    state = train_step.init_state(jax.tree.map(jnp.copy, params), tx, 0)  # donated
    update = train_step.make_update_fn(config, mesh, graphdef, jax.eval_shape(lambda s=state: s))
    state = jax.device_put(state, update.shardings)
    state, out = update(state, base_params, make_batch("omniopd"))
    metrics[pack] = jax.device_get(out)
  packed = packing.pack_for_update(
    config, registry.get("omniopd"), make_batch("omniopd"), mesh, sharding.DEFAULT_RULES
  )
  assert (packed.micro_batches, packed.tokens.shape[0]) == (2, 8)
  assert metrics[True]["pack/rows"] == 8 and metrics[True]["pack/micro_batches"] == 2
  for key in ("train/loss", "train/grad_norm", "loss/pg", "loss/kl_anchor"):
    np.testing.assert_allclose(metrics[True][key], metrics[False][key], rtol=1e-5)
  state, _ = update(state, base_params, make_batch("omniopd", 1, np.roll(LENGTHS, 3)))
  assert update.jitted._cache_size() == 1  # 2 micro-batches of 4 packed rows again
