"""Tests for the losses (methods/losses.py and each method module): each loss vs a float64 NumPy reference, gradients, masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omniopd_jax.configs import math as math_config
from omniopd_jax.methods import base, grpo, losses, omniopd, opd, registry, sft

B, T, V = 3, 9, 13


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_reduce(x, mask, reduction, norm):
  x = np.where(mask, x, 0.0)
  if reduction == "sequence_sum":
    rows = max(int(mask.any(-1).sum()), 1)
    return x.sum() / (norm * rows)
  return x.sum() / max(int(mask.sum()), 1)


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  base = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
  lengths = np.array([9, 5, 0])  # the last row is padding
  mask = np.arange(T)[None, :] < lengths[:, None]
  starts = np.array([[0, 5], [1, 0], [0, 0]], np.int32)
  valid = np.array([[True, True], [True, False], [False, False]])
  weights = np.array([[0.7, -0.2], [0.4, 9.0], [5.0, 5.0]], np.float32)
  return dict(
    logits=logits,
    base=base,
    targets=targets,
    mask=mask,
    starts=starts,
    valid=valid,
    weights=weights,
  )


def test_chunk_token_weights_matches_loop(batch):
  tw, aud = omniopd.chunk_token_weights(batch["starts"], batch["valid"], batch["weights"], 3, T)
  exp_w = np.zeros((B, T), np.float32)
  exp_a = np.zeros((B, T), bool)
  for b in range(B):
    for m in range(2):
      if batch["valid"][b, m]:
        for s in range(batch["starts"][b, m], batch["starts"][b, m] + 3):
          exp_w[b, s], exp_a[b, s] = batch["weights"][b, m], True
  np.testing.assert_array_equal(np.asarray(tw), exp_w)
  np.testing.assert_array_equal(np.asarray(aud), exp_a)
  assert tw.dtype == jnp.float32 and aud.dtype == jnp.bool_


def _np_omniopd(batch, tw, aud, beta, reduction, norm, kl_anchor=True):
  lp = _np_log_softmax(batch["logits"])
  blp = _np_log_softmax(batch["base"])
  tok_lp = np.take_along_axis(lp, batch["targets"][..., None], -1)[..., 0]
  kl = (np.exp(blp) * (blp - lp)).sum(-1)
  mask = batch["mask"]
  aud = aud & mask
  x = np.where(aud, -tw * tok_lp, 0.0) + (
    beta * np.where(mask & ~aud, kl, 0.0) if kl_anchor else 0.0
  )
  return _np_reduce(x, mask, reduction, norm)


@pytest.mark.parametrize(
  "reduction,norm", [("sequence_sum", 7.0), ("sequence_sum", None), ("token_mean", None)]
)
@pytest.mark.parametrize("kl_anchor", [True, False])
def test_omniopd_loss_matches_numpy(batch, reduction, norm, kl_anchor):
  tw, aud = omniopd.chunk_token_weights(batch["starts"], batch["valid"], batch["weights"], 3, T)
  loss, aux = omniopd.omniopd_loss(
    jnp.asarray(batch["logits"]),
    jnp.asarray(batch["base"]),
    jnp.asarray(batch["targets"]),
    jnp.asarray(batch["mask"]),
    tw,
    aud,
    beta=0.3,
    reduction=reduction,
    norm_constant=norm,
    kl_anchor=kl_anchor,
  )
  expected = _np_omniopd(
    batch, np.asarray(tw), np.asarray(aud), 0.3, reduction, norm or T, kl_anchor
  )
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss/pg"] + aux["loss/kl_anchor"]), expected, rtol=1e-5)
  assert float(aux["omniopd/tokens_audited_frac"]) == pytest.approx(
    9 / 14
  )  # row 0: 6 of 9, row 1: 3 of 5
  if not kl_anchor:
    assert float(aux["loss/kl_anchor"]) == 0.0


def test_omniopd_gradient_matches_analytic(batch):
  tw, aud = omniopd.chunk_token_weights(batch["starts"], batch["valid"], batch["weights"], 3, T)
  beta, norm = 0.3, 4.0

  def f(logits):
    return omniopd.omniopd_loss(
      logits,
      jnp.asarray(batch["base"]),
      jnp.asarray(batch["targets"]),
      jnp.asarray(batch["mask"]),
      tw,
      aud,
      beta=beta,
      norm_constant=norm,
    )[0]

  grad = np.asarray(jax.grad(f)(jnp.asarray(batch["logits"])))
  p = np.exp(_np_log_softmax(batch["logits"]))
  pb = np.exp(_np_log_softmax(batch["base"]))
  onehot = np.eye(V)[batch["targets"]]
  mask = batch["mask"]
  a = (np.asarray(aud) & mask)[..., None]
  u = (mask & ~np.asarray(aud))[..., None]
  rows = 2  # rows with any token
  expected = (-np.asarray(tw)[..., None] * a * (onehot - p) + beta * u * (p - pb)) / (norm * rows)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
  assert np.all(grad[2] == 0) and np.all(grad[1, 5:] == 0)  # padding gets no gradient


def test_masks_and_padding_change_nothing_they_should_not(batch):
  tw, aud = omniopd.chunk_token_weights(batch["starts"], batch["valid"], batch["weights"], 3, T)

  def loss_of(logits, base, targets, mask, tw, aud, reduction):
    return float(
      omniopd.omniopd_loss(
        jnp.asarray(logits),
        jnp.asarray(base),
        jnp.asarray(targets),
        jnp.asarray(mask),
        jnp.asarray(tw),
        jnp.asarray(aud),
        beta=0.3,
        reduction=reduction,
        norm_constant=T,
      )[0]
    )

  rng = np.random.default_rng(1)
  for reduction in losses.REDUCTIONS:
    ref = loss_of(
      batch["logits"], batch["base"], batch["targets"], batch["mask"], tw, aud, reduction
    )
    # Garbage logits/targets/weights at masked positions.
    pad = ~batch["mask"]
    logits = np.where(pad[..., None], rng.normal(size=(B, T, V)) * 50, batch["logits"])
    targets = np.where(pad, rng.integers(0, V, size=(B, T)), batch["targets"])
    tw2 = np.where(pad, 123.0, np.asarray(tw))
    assert loss_of(
      logits, batch["base"], targets, batch["mask"], tw2, aud, reduction
    ) == pytest.approx(ref, rel=1e-6)
    # A token weight on unaudited tokens and base logits on audited tokens do not matter.
    tw3 = np.where(np.asarray(aud), np.asarray(tw), 7.0)
    base = np.where(np.asarray(aud)[..., None], rng.normal(size=(B, T, V)), batch["base"])
    assert loss_of(
      batch["logits"], base, batch["targets"], batch["mask"], tw3, aud, reduction
    ) == pytest.approx(ref, rel=1e-6)
    # Extra padding rows and extra padded time steps change nothing (with a fixed norm_constant).
    grow = lambda x, fill: np.concatenate([x, np.full((2,) + x.shape[1:], fill, x.dtype)], 0)
    widen = lambda x, fill: np.concatenate(
      [x, np.full((x.shape[0], 4) + x.shape[2:], fill, x.dtype)], 1
    )
    args = [
      batch["logits"],
      batch["base"],
      batch["targets"],
      batch["mask"],
      np.asarray(tw),
      np.asarray(aud),
    ]
    fills = [3.0, -1.0, 1, False, 0.5, True]
    assert loss_of(*[grow(x, f) for x, f in zip(args, fills)], reduction) == pytest.approx(
      ref, rel=1e-6
    )
    assert loss_of(*[widen(x, f) for x, f in zip(args, fills)], reduction) == pytest.approx(
      ref, rel=1e-6
    )
  with pytest.raises(ValueError, match="base_logits"):
    omniopd.omniopd_loss(batch["logits"], None, batch["targets"], batch["mask"], tw, aud, beta=0.1)
  no_anchor, _ = omniopd.omniopd_loss(
    batch["logits"], None, batch["targets"], batch["mask"], tw, aud, beta=0.1, kl_anchor=False
  )
  assert np.isfinite(float(no_anchor))
  with pytest.raises(ValueError, match="reduction"):
    omniopd.omniopd_loss(
      batch["logits"],
      batch["base"],
      batch["targets"],
      batch["mask"],
      tw,
      aud,
      beta=0.1,
      reduction="sum",
    )


def test_kl_on_audited_anchors_every_token(batch):
  tw, aud = omniopd.chunk_token_weights(batch["starts"], batch["valid"], batch["weights"], 3, T)
  args = (batch["logits"], batch["base"], batch["targets"], batch["mask"], tw * 0.0, aud)
  loss, _ = omniopd.omniopd_loss(*args, beta=1.0, reduction="token_mean", kl_on_audited=True)
  lp, blp = _np_log_softmax(batch["logits"]), _np_log_softmax(batch["base"])
  kl = (np.exp(blp) * (blp - lp)).sum(-1)
  np.testing.assert_allclose(float(loss), kl[batch["mask"]].mean(), rtol=1e-5)


def test_opd_sampled_loss(batch):
  rng = np.random.default_rng(2)
  teacher_lp = np.log(rng.random((B, T))).astype(np.float32)
  mask = batch["mask"]

  def f(logits):
    return opd.opd_sampled_loss(
      logits, batch["targets"], jnp.asarray(teacher_lp), mask, reduction="token_mean"
    )

  (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(batch["logits"]))
  lp = _np_log_softmax(batch["logits"])
  tok = np.take_along_axis(lp, batch["targets"][..., None], -1)[..., 0]
  adv = teacher_lp - tok
  np.testing.assert_allclose(
    float(loss), _np_reduce(-adv * tok, mask, "token_mean", None), rtol=1e-5
  )
  np.testing.assert_allclose(
    float(aux["opd/reverse_kl_estimate"]), (tok - teacher_lp)[mask].mean(), rtol=1e-5
  )
  # grad = (log p - log p_T) * d log p(y) / dz = (log p - log p_T)(onehot - p), stop-gradient advantage.
  onehot = np.eye(V)[batch["targets"]]
  expected = (tok - teacher_lp)[..., None] * (onehot - np.exp(lp)) * mask[..., None] / mask.sum()
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-7)


def test_opd_full_kl_loss(batch):
  mask = batch["mask"]
  teacher = batch["base"]

  def f(logits):
    return opd.opd_full_kl_loss(logits, jnp.asarray(teacher), mask, norm_constant=5.0)[0]

  loss, grad = jax.value_and_grad(f)(jnp.asarray(batch["logits"]))
  lp, tlp = _np_log_softmax(batch["logits"]), _np_log_softmax(teacher)
  p = np.exp(lp)
  kl = (p * (lp - tlp)).sum(-1)
  np.testing.assert_allclose(float(loss), _np_reduce(kl, mask, "sequence_sum", 5.0), rtol=1e-5)
  # d KL(p || q) / dz_i = p_i (log p_i - log q_i - KL).
  expected = p * (lp - tlp - kl[..., None]) * mask[..., None] / (5.0 * 2)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="same tokenizer"):
    opd.opd_full_kl_loss(batch["logits"], teacher[..., :-1], mask)


def test_grpo_advantages_and_loss(batch):
  rewards = np.array([1.0, 0.0, 0.0, 0.5, 0.5, 0.5], np.float32)
  adv = np.asarray(grpo.group_advantages(rewards, 3))
  r = rewards.reshape(2, 3)
  ref = ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)).reshape(-1)
  np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-6)
  assert np.all(adv[3:] == 0)  # all-equal rewards: no signal, no NaN
  np.testing.assert_allclose(
    np.asarray(grpo.group_advantages(rewards, 3, normalize_std=False))[:3], [2 / 3, -1 / 3, -1 / 3]
  )
  with pytest.raises(ValueError, match="multiple"):
    grpo.group_advantages(rewards, 4)

  rng = np.random.default_rng(3)
  lp = _np_log_softmax(batch["logits"])
  tok = np.take_along_axis(lp, batch["targets"][..., None], -1)[..., 0]
  old = (tok + rng.normal(size=(B, T)) * 0.4).astype(
    np.float32
  )  # ratios both inside and outside the clip
  advantages = np.array([1.5, -0.7, 2.0], np.float32)
  mask = batch["mask"]
  loss, aux = grpo.grpo_loss(
    batch["logits"],
    old,
    batch["targets"],
    mask,
    advantages,
    base_logits=batch["base"],
    beta=0.05,
    clip_eps=0.2,
  )
  ratio = np.exp(tok - old)
  a = advantages[:, None]
  surrogate = np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a)
  blp = _np_log_softmax(batch["base"])
  kl = (np.exp(blp) * (blp - lp)).sum(-1)
  expected = _np_reduce(-surrogate + 0.05 * kl, mask, "sequence_sum", T)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  clip_frac = (np.abs(ratio - 1) > 0.2)[mask].mean()
  assert 0 < clip_frac < 1
  np.testing.assert_allclose(float(aux["grpo/clip_frac"]), clip_frac, rtol=1e-6)
  no_kl, aux2 = grpo.grpo_loss(
    batch["logits"], old, batch["targets"], mask, advantages, beta=0.05, kl_anchor=False
  )
  np.testing.assert_allclose(
    float(no_kl), _np_reduce(-surrogate, mask, "sequence_sum", T), rtol=1e-5
  )
  assert float(aux2["loss/kl_anchor"]) == 0.0


def test_sft_loss(batch):
  mask = batch["mask"]
  lp = _np_log_softmax(batch["logits"])
  nll = -np.take_along_axis(lp, batch["targets"][..., None], -1)[..., 0]
  loss, aux = sft.sft_loss(jnp.asarray(batch["logits"], jnp.bfloat16), batch["targets"], mask)
  lp16 = _np_log_softmax(np.asarray(jnp.asarray(batch["logits"], jnp.bfloat16).astype(jnp.float32)))
  nll16 = -np.take_along_axis(lp16, batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), nll16[mask].mean(), rtol=1e-5)  # computed in float32
  assert loss.dtype == jnp.float32
  seq, _ = sft.sft_loss(
    batch["logits"], batch["targets"], mask, reduction="sequence_sum", norm_constant=3.0
  )
  np.testing.assert_allclose(float(seq), _np_reduce(nll, mask, "sequence_sum", 3.0), rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss/nll_token_mean"]), nll16[mask].mean(), rtol=1e-5)


def test_losses_jit():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)
  targets = jnp.zeros((2, 4), jnp.int32)
  mask = jnp.ones((2, 4), bool)
  tw, aud = omniopd.chunk_token_weights(
    jnp.array([[1], [0]]), jnp.array([[True], [False]]), jnp.array([[0.5], [0.0]]), 2, 4
  )
  fn = jax.jit(lambda z, b: omniopd.omniopd_loss(z, b, targets, mask, tw, aud, beta=0.1))
  loss, aux = fn(logits, logits)
  assert np.isfinite(float(loss)) and float(aux["kl/unaudited_mean"]) == pytest.approx(
    0.0, abs=1e-6
  )


def test_centered_weights_on_device_use_the_global_audited_mean():
  config = math_config.get_config("smoke")
  config.omniopd.weight_form = "centered"
  seq = base.Sequences(*(np.zeros((2, 3), np.int32) for _ in range(4)))
  batch = omniopd.OmniOPDBatch(
    seq=seq, fork_starts=np.zeros((2, 2), np.int32),
    fork_mask=np.array([[True, False], [True, True]]),
    fork_weight=np.array([[0.9, 7.0], [0.3, 0.6]], np.float32),
  )  # fmt: skip
  got = jax.jit(lambda b: omniopd.center_fork_weights(config, b))(batch)
  np.testing.assert_allclose(np.asarray(got.fork_weight), [[0.3, 0.0], [-0.3, 0.0]], atol=1e-6)
  config.omniopd.weight_form = "pi_hat"
  assert omniopd.center_fork_weights(config, batch) is batch


def test_registry_maps_every_method_and_refuses_unknown_ones():
  assert sorted(registry.METHODS) == ["grpo", "omniopd", "opd", "sft"]
  for name, method in registry.METHODS.items():
    assert method.name == name and callable(method.collect) and callable(method.loss)
  with pytest.raises(ValueError, match="choose from"):
    registry.get("ppo")


def test_sft_targets():
  example = {"question": "1 + 2 =", "answer": "3", "task": "chain_sum",
             "metadata": {"expression": "1 + 2"}}  # fmt: skip
  assert sft.target_text(example, "answer") == "Answer: 3"
  assert sft.target_text(example, "worked").endswith("Answer: 3")
  with pytest.raises(ValueError, match="worked solutions exist"):
    sft.target_text({**example, "task": "gsm8k"}, "worked")
  with pytest.raises(ValueError, match="choose from"):
    sft.target_text(example, "teacher")
