"""The real train step with the tiled head and fused attention equals the dense update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omniopd_jax import sharding
from omniopd_jax.configs import math as math_config
from omniopd_jax.methods import base, grpo, omniopd, opd
from omniopd_jax.models import lm as model_lib
from omniopd_jax.train import step as train_step

# Tied and untied heads; vocabularies that the tile (4 positions) leaves a remainder of.
MODELS = {
  "llama_untied": model_lib.ModelConfig(
    vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2),
  "qwen3_tied": model_lib.ModelConfig(
    architecture="qwen3", vocab_size=61, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    qk_norm=True, tie_word_embeddings=True),
}  # fmt: skip
B, P, L, M = 8, 5, 11, 2


def make_batch(vocab, method="omniopd", seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, size=(B, P + L)).astype(np.int32)
  mask = np.ones((B, P + L), bool)
  mask[:, :2] = rng.rand(B, 2) < 0.5  # left padding
  response_mask = np.arange(L)[None] < rng.randint(3, L + 1, size=(B, 1))
  mask[:, P:] = response_mask
  seq = base.Sequences(tokens=tokens, attention_mask=mask, response_tokens=tokens[:, P:],
                       response_mask=response_mask)  # fmt: skip
  fork_mask, fork_weight = rng.rand(B, M) < 0.7, rng.rand(B, M).astype(np.float32) - 0.3
  teacher_logprobs = -rng.rand(B, L).astype(np.float32)
  old_logprobs = -rng.rand(B, L).astype(np.float32) - 1.0
  advantages = rng.randn(B).astype(np.float32)
  if method == "grpo":
    return grpo.GRPOBatch(seq=seq, advantages=advantages, old_logprobs=old_logprobs)
  if method == "opd":
    return opd.OPDBatch(seq=seq, teacher_logprobs=teacher_logprobs)
  starts = np.tile(np.array([[0, 4]], np.int32), (B, 1))
  return omniopd.OmniOPDBatch(seq=seq, fork_starts=starts, fork_mask=fork_mask,
                              fork_weight=fork_weight)  # fmt: skip


def run_update(cfg, method, head, attention, full_vocab=False):
  config = math_config.get_config("smoke")
  config.method = method
  config.omniopd.update(num_forks=M, chunk_len=4)
  config.opd.estimator = "full_vocab" if full_vocab else "sampled"
  # The tiled path also runs its MLPs over chunks of 4 of the 15 tokens (ops/token_chunks).
  config.model.update(head=head, attention=attention, head_vocab_tile=4)
  config.model.mlp_chunk = 4 if head == "tiled" else 0
  config.optimizer.update(learning_rate=1e-2, grad_clip=0.0)
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])
  with jax.set_mesh(mesh):
    model = sharding.create_sharded(lambda: model_lib.CausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
    other = sharding.create_sharded(lambda: model_lib.CausalLM(cfg, rngs=nnx.Rngs(1)), mesh)
  graphdef, params = nnx.split(model)
  tx = train_step.make_optimizer(config.optimizer, config.num_steps)
  state = train_step.init_state(params, tx, 0)
  update = train_step.make_update_fn(config, mesh, graphdef, jax.eval_shape(lambda: state))
  state = jax.device_put(state, update.shardings)
  base_params = jax.tree.map(
    lambda x: x * 1.5, nnx.state(other)
  )  # a base that differs from the student
  teacher = nnx.state(other) if full_vocab else None
  state, metrics = update(state, base_params, make_batch(cfg.vocab_size, method), teacher)
  return metrics, jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize(  # each case compiles two sharded updates (~1 min on 2 cores)
  "name,method,full_vocab",
  [("llama_untied", "omniopd", False), ("qwen3_tied", "grpo", False), ("qwen3_tied", "opd", True)],
)
def test_tiled_update_equals_dense_update(name, method, full_vocab):
  cfg = MODELS[name]
  dense_metrics, dense = run_update(cfg, method, "dense", "dense", full_vocab)
  metrics, params = run_update(cfg, method, "tiled", "blockwise", full_vocab)
  for key, value in dense_metrics.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(dense)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tiled_gradients_equal_dense_gradients_with_remat():
  """The gradient itself (not only one Adam step, which normalises it away) and remat."""
  cfg = MODELS["qwen3_tied"]
  config = math_config.get_config("smoke")
  config.omniopd.update(num_forks=M, chunk_len=4)
  model = model_lib.CausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  base_params = jax.tree.map(lambda x: x * 1.5, params)
  batch = jax.tree.map(jnp.asarray, make_batch(cfg.vocab_size, seed=1))
  method = omniopd.METHOD

  def loss(params, head, attention, remat):
    config.model.update(head=head, attention=attention, remat=remat, head_vocab_tile=3)
    config.model.mlp_chunk = 5 if head == "tiled" else 0  # 15 tokens: three chunks
    if head == "tiled":
      stats = train_step.response_stats(config.model, graphdef, params, batch.seq, base_params)
      return method.loss(config, stats, batch, stats)[0]
    logits = train_step.response_logits(graphdef, params, batch.seq, remat, attention)
    base_logits = train_step.response_logits(graphdef, base_params, batch.seq)
    return method.loss(config, logits, batch, base_logits)[0]

  want = jax.grad(loss)(params, "dense", "dense", False)
  got = jax.grad(loss)(params, "tiled", "blockwise", True)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = max(np.abs(b).max(), 1e-8)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() / scale < 1e-5
