"""ops/vocab_tiling.py: the tiled head's statistics and gradients against dense [B, L, V] maths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omniopd_jax.methods import losses, opd
from omniopd_jax.models import lm as model_lib
from omniopd_jax.ops import vocab_tiling as vt

# Llama- and Qwen3-shaped toy configs; vocabularies that no tile size divides.
CONFIGS = {
  "llama_untied": dict(architecture="llama", vocab_size=97, hidden_size=24, intermediate_size=40,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
  "qwen3_tied": dict(architecture="qwen3", vocab_size=131, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, qk_norm=True, tie_word_embeddings=True),
}  # fmt: skip


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def _weighted(stats, cots):
  """A scalar that depends on every statistic with its own random weight per token."""
  return sum(jnp.sum(c * s) for c, s in zip(cots, stats) if s is not None)


def test_statistics_equal_brute_force_numpy():
  rng = np.random.RandomState(0)
  h, w = rng.randn(2, 5, 6), rng.randn(6, 11)  # vocab 11, tile 2: padded tail
  hb, wb, ht, wt = rng.randn(2, 5, 6), rng.randn(6, 11), rng.randn(2, 5, 6), rng.randn(11, 6)
  y = rng.randint(0, 11, size=(2, 5))
  f32 = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]
  s = vt.head_stats(vt.Head(*f32(h, w)), jnp.asarray(y), base=vt.Head(*f32(hb, wb)),
                    teacher=vt.Head(*f32(ht, wt), "ve"), vocab_tile=2)  # fmt: skip

  def logsoftmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  lp, lpb, lpt = logsoftmax(h @ w), logsoftmax(hb @ wb), logsoftmax(ht @ wt.T)
  p, pb = np.exp(lp), np.exp(lpb)
  np.testing.assert_allclose(s.logprob, np.take_along_axis(lp, y[..., None], -1)[..., 0], 1e-5)
  np.testing.assert_allclose(s.entropy, -(p * lp).sum(-1), 1e-5)
  np.testing.assert_allclose(s.kl_base, (pb * (lpb - lp)).sum(-1), 1e-5, 1e-6)
  np.testing.assert_allclose(s.kl_teacher, (p * (lp - lpt)).sum(-1), 1e-5, 1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("tile", [7, 32])
def test_values_and_gradients_equal_the_dense_path_on_real_models(name, tile):
  """Student, frozen base and teacher are real models; the head is tied or untied."""
  cfg = model_lib.ModelConfig(**CONFIGS[name])
  student, base, teacher = (_peaked(cfg, seed) for seed in range(3))
  graphdef, params = nnx.split(student, nnx.Param)
  rng = np.random.RandomState(1)
  ids = jnp.asarray(rng.randint(0, cfg.vocab_size, size=(2, 11)))
  mask = jnp.asarray(np.arange(11)[None] >= np.array([[0], [3]]))  # row 1 left-padded
  targets = jnp.asarray(rng.randint(0, cfg.vocab_size, size=(2, 11)))
  cots = [jnp.asarray(rng.randn(2, 11), jnp.float32) for _ in range(4)]
  head_of = lambda m: vt.Head(m.hidden_states(ids, mask), *model_lib.head_weights(m))

  def objective(params, stats_fn):
    model = nnx.merge(graphdef, params)
    stats = stats_fn(head_of(model), targets, base=head_of(base), teacher=head_of(teacher))
    return _weighted(stats, cots), stats

  tiled = lambda *a, **k: vt.head_stats(*a, vocab_tile=tile, **k)
  (v1, s1), g1 = jax.value_and_grad(objective, has_aux=True)(params, tiled)
  (v2, s2), g2 = jax.value_and_grad(objective, has_aux=True)(params, vt.dense_head_stats)
  for a, b in zip(s1, s2):
    assert _rel(a, b) < 1e-5
  assert _rel(v1, v2) < 1e-5
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert _rel(a, b) < 1e-5


def _peaked(cfg, seed):
  """A random model whose logits are O(1), not the near-uniform O(0.1) of the 0.02 init: KLs
  between two such models are then O(1), so a relative tolerance means something."""
  model = model_lib.CausalLM(cfg, rngs=nnx.Rngs(seed))
  for param in (model.embed_tokens, model.lm_head):
    if param is not None:
      param[...] = param[...] * 8.0
  return model


def test_dense_reference_matches_the_losses_module():
  """The dense statistics are the project's own loss maths (losses.py) on full logits."""
  rng = np.random.RandomState(2)
  h, w = jnp.asarray(rng.randn(2, 7, 8), jnp.float32), jnp.asarray(rng.randn(8, 13), jnp.float32)
  hb, ht = (
    jnp.asarray(rng.randn(2, 7, 8), jnp.float32),
    jnp.asarray(rng.randn(2, 7, 8), jnp.float32),
  )
  y = jnp.asarray(rng.randint(0, 13, size=(2, 7)))
  s = vt.head_stats(vt.Head(h, w), y, base=vt.Head(hb, w), teacher=vt.Head(ht, w), vocab_tile=4)
  z, zb, zt = h @ w, hb @ w, ht @ w
  np.testing.assert_allclose(s.logprob, losses.token_logprobs(z, y), 1e-5, 1e-6)
  np.testing.assert_allclose(s.kl_base, losses.kl_to_base(zb, z), 1e-5, 1e-6)
  np.testing.assert_allclose(s.kl_teacher, opd.reverse_kl_to_teacher(z, zt), 1e-5, 1e-6)


def test_frozen_inputs_get_no_gradient_and_unused_outputs_cost_nothing():
  rng = np.random.RandomState(3)
  h, w = jnp.asarray(rng.randn(1, 4, 5), jnp.float32), jnp.asarray(rng.randn(5, 9), jnp.float32)
  hb, wb = jnp.asarray(rng.randn(1, 4, 5), jnp.float32), jnp.asarray(rng.randn(5, 9), jnp.float32)
  y = jnp.zeros((1, 4), jnp.int32)
  f = lambda h, w, hb, wb: vt.head_stats(vt.Head(h, w), y, base=vt.Head(hb, wb)).kl_base.sum()
  g = jax.grad(f, argnums=(0, 1, 2, 3))(h, w, hb, wb)
  assert np.abs(g[0]).sum() > 0 and np.abs(g[1]).sum() > 0
  assert not np.any(g[2]) and not np.any(g[3])
  s = vt.head_stats(vt.Head(h, w), y)
  assert s.kl_base is None and s.kl_teacher is None


def test_bfloat16_hidden_states_give_float32_statistics_close_to_float32():
  rng = np.random.RandomState(4)
  h, w = jnp.asarray(rng.randn(2, 6, 16), jnp.float32), jnp.asarray(rng.randn(16, 50) * 0.3)
  y = jnp.asarray(rng.randint(0, 50, size=(2, 6)))
  s32 = vt.head_stats(vt.Head(h, w), y)
  s16 = vt.head_stats(vt.Head(h.astype(jnp.bfloat16), w), y)
  assert s16.logprob.dtype == jnp.float32
  np.testing.assert_allclose(s16.logprob, s32.logprob, atol=0.1)
  grad = jax.grad(lambda h: vt.head_stats(vt.Head(h, w), y).logprob.sum())
  assert grad(h.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_mismatched_inputs_are_rejected_with_a_reason():
  h, w = jnp.zeros((1, 3, 4)), jnp.zeros((4, 10))
  y = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="same tokenizer"):
    vt.head_stats(vt.Head(h, w), y, teacher=vt.Head(h, jnp.zeros((4, 11))))
  with pytest.raises(ValueError, match="layout"):
    vt.head_stats(vt.Head(h, w, "vd"), y)
  with pytest.raises(ValueError, match="hidden size"):
    vt.head_stats(vt.Head(h, jnp.zeros((5, 10))), y)
  with pytest.raises(ValueError, match="targets"):
    vt.head_stats(vt.Head(h, w), jnp.zeros((1, 4), jnp.int32))


def test_default_tile_is_bounded_and_a_power_of_two():
  assert vt.default_vocab_tile(151936, 8 * 8192) == 512
  assert vt.default_vocab_tile(64, 10) == 64
  assert vt.default_vocab_tile(151936, 16) == vt.MAX_TILE  # short rows: still a slice of the head
  t = vt.default_vocab_tile(151936, 4096)
  assert t & (t - 1) == 0 and t * 4096 * 4 <= vt.TILE_BYTES


def test_jaxpr_of_the_gradient_holds_no_full_logits():
  """No intermediate of the forward or backward has L x V elements per row (only tiles)."""
  b, length, e, v, tile = 1, 64, 8, 50, 8
  h, w = jnp.ones((b, length, e)), jnp.ones((e, v))
  y = jnp.zeros((b, length), jnp.int32)
  loss = lambda h, w: sum(x.sum() for x in vt.head_stats(vt.Head(h, w), y, base=vt.Head(h, w),
                                                          vocab_tile=tile) if x is not None)  # fmt: skip
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, w)
  biggest = max(
    int(np.prod(var.aval.shape)) for eqn in _all_eqns(jaxpr.jaxpr) for var in eqn.outvars
  )
  assert biggest < length * v  # a [B, L, T] tile is 64 x 8; full logits would be 64 x 50


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.core.jaxprs_in_params(eqn.params):
      yield from _all_eqns(sub)
