"""Tests for omniopd_jax.reward: posterior vs an independent reference, weight forms, arrays."""

import math

import numpy as np
import pytest

from omniopd_jax.reward import posterior as reward


def test_soft_counts_ignore_failures():
  sim = np.array([[0.5, np.nan, 1.0], [np.nan, np.nan, np.nan], [0.0, 0.0, 0.25]])
  k, n_valid = reward.soft_counts(sim)
  np.testing.assert_allclose(k, [1.5, 0.0, 0.25])
  assert n_valid.tolist() == [2, 0, 3] and k.dtype == np.float32 and n_valid.dtype == np.int32


def test_dirichlet_posterior_matches_reference():
  rng = np.random.default_rng(0)
  n_valid = rng.integers(0, 11, size=(400, 7))
  k = rng.random((400, 7)) * n_valid
  pi_bar = rng.random((400, 7))
  for alpha in (0.0, 0.5, 1.0, 4.0):
    pi_hat, audited = reward.dirichlet_posterior(k, n_valid, pi_bar, alpha)
    assert pi_hat.dtype == np.float32 and audited.dtype == np.bool_
    for i in range(400):
      for j in range(7):
        n = int(n_valid[i, j])
        assert audited[i, j] == (n > 0)
        expected = (k[i, j] + alpha * pi_bar[i, j]) / (n + alpha) if n > 0 else 0.0
        assert math.isclose(pi_hat[i, j], expected, rel_tol=1e-6, abs_tol=1e-7)


def test_posterior_edge_cases():
  # n_valid == 0 is unaudited even though the prior alone would give pi_bar.
  pi_hat, audited = reward.dirichlet_posterior(
    np.array([0.0, 3.0]), np.array([0, 4]), np.array([0.9, 0.5]), 1.0
  )
  assert audited.tolist() == [False, True]
  np.testing.assert_allclose(pi_hat, [0.0, 3.5 / 5])
  ph, au = reward.dirichlet_posterior(np.array([2.0, 0.0]), np.array([4, 0]), 0.0, alpha=0.0)
  np.testing.assert_allclose(ph, [0.5, 0.0])
  assert au.tolist() == [True, False]
  # Broadcasting a scalar prior.
  ph, _ = reward.dirichlet_posterior(np.array([[1.0, 2.0]]), np.array([[2, 2]]), 0.5, alpha=2.0)
  np.testing.assert_allclose(ph, [[0.5, 0.75]])
  with pytest.raises(ValueError, match="alpha"):
    reward.dirichlet_posterior(1.0, 2, 0.5, alpha=-1.0)
  with pytest.raises(ValueError, match="k <= n_valid"):
    reward.dirichlet_posterior(3.0, 2, 0.5, alpha=1.0)
  with pytest.raises(ValueError, match="pi_bar"):
    reward.dirichlet_posterior(1.0, 2, 1.5, alpha=1.0)


def test_pi_bar_helpers():
  np.testing.assert_allclose(
    reward.pi_bar_from_logprobs(np.log([[0.5, 0.125], [1.0, 1.0]])), [0.25, 1.0], rtol=1e-6
  )
  lp = np.log(np.array([[0.5, 0.5, 0.25, 1.0, 0.1], [0.9, 0.9, 0.9, 0.9, 0.9]], np.float32))
  out = reward.chunk_pi_bar(
    lp, np.array([[1, 3], [0, 99]]), np.array([[True, True], [True, False]]), 2
  )
  np.testing.assert_allclose(out, [[math.sqrt(0.5 * 0.25), math.sqrt(0.1)], [0.9, 0.0]], rtol=1e-5)
  with pytest.raises(ValueError, match="runs past"):
    reward.chunk_pi_bar(lp, np.array([[4]]), np.array([[True]]), 2)


def test_chunk_weight_forms():
  pi_hat = np.array([[0.9, 0.5, 0.0], [0.4, 0.7, 0.3]], np.float32)
  audited = np.array([[True, True, False], [True, False, False]])
  np.testing.assert_allclose(
    reward.chunk_weights(pi_hat, audited, "pi_hat"), [[0.9, 0.5, 0], [0.4, 0, 0]]
  )
  # "centered" is centred on device over the global batch (methods.omniopd): pi_hat here.
  np.testing.assert_allclose(
    reward.chunk_weights(pi_hat, audited, "centered"), [[0.9, 0.5, 0], [0.4, 0, 0]]
  )
  group = np.stack([pi_hat, pi_hat * 0 + 0.5, pi_hat * 0 + 0.2], -1)  # [B, M, K=3], draft 0 own
  expected = np.where(audited, pi_hat - (pi_hat + 0.7) / 3, 0)
  np.testing.assert_allclose(
    reward.chunk_weights(pi_hat, audited, "group", group), expected, rtol=1e-6, atol=1e-7
  )
  np.testing.assert_array_equal(reward.chunk_weights(pi_hat, np.zeros_like(audited), "centered"), 0)
  with pytest.raises(ValueError, match="group_pi_hat"):
    reward.chunk_weights(pi_hat, audited, "group")
  with pytest.raises(ValueError, match="Unknown chunk weight form"):
    reward.chunk_weights(pi_hat, audited, "softmax")


def test_build_reward_arrays_and_metrics():
  nan = np.nan
  sim = np.array(  # [B=2, M=2, N=3]; slot (1, 1) had no fork, (0, 1) got no teacher sample back
    [[[1.0, 0.5, nan], [nan, nan, nan]], [[0.0, 0.0, 0.0], [nan, nan, nan]]], np.float32
  )
  pi_bar = np.array([[0.5, 0.8], [0.2, 0.0]], np.float32)
  out = reward.build_reward_arrays(sim, pi_bar, alpha=1.0, form="pi_hat")
  assert (
    out.weight.dtype == np.float32 and out.mask.dtype == np.bool_ and out.weight.shape == (2, 2)
  )
  assert out.mask.tolist() == [[True, False], [True, False]]
  np.testing.assert_allclose(out.pi_hat, [[2.0 / 3, 0.0], [0.2 / 4, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(out.weight, out.pi_hat)
  assert out.n_valid.tolist() == [[2, 0], [3, 0]] and out.num_samples == 3
  no_prior = reward.build_reward_arrays(sim, pi_bar, form="pi_hat", use_prior=False)
  np.testing.assert_allclose(no_prior.pi_hat, [[0.75, 0.0], [0.0, 0.0]])
  centered = reward.build_reward_arrays(sim, pi_bar, form="centered")
  np.testing.assert_allclose(centered.weight, out.weight)  # centred later, on device

  fork_valid = np.array([[True, True], [True, False]])
  m = reward.reward_metrics(out, fork_valid, num_bins=4)
  assert m["omniopd/pi_hat_mean"] == pytest.approx((2.0 / 3 + 0.05) / 2)
  assert m["omniopd/k_mean"] == pytest.approx(0.75)
  assert m["omniopd/n_valid_frac"] == pytest.approx(5 / 9)
  assert m["omniopd/audited_frac"] == pytest.approx(2 / 3)
  assert m["omniopd/num_audited"] == 2.0
  hist = [m[f"omniopd/pi_hat_hist/{lo:.2f}"] for lo in (0.0, 0.25, 0.5, 0.75)]
  assert hist == [0.5, 0.0, 0.5, 0.0]
  np.testing.assert_allclose(sorted(m.pop("omniopd/pi_hat")), [0.05, 2.0 / 3], rtol=1e-6)
  assert all(isinstance(v, float) for v in m.values())

  # Group form: sim [B, M, K, N] with draft 0 = own chunk; every draft sees the same teacher samples.
  drafts = np.stack(
    [sim, np.where(np.isnan(sim), nan, 1.0), np.where(np.isnan(sim), nan, 0.0)], axis=2
  )
  group = reward.build_reward_arrays(drafts, np.stack([pi_bar] * 3, -1), form="group")
  assert group.draft_pi_hat.shape == (2, 2, 3)
  np.testing.assert_allclose(group.pi_hat, out.pi_hat)
  np.testing.assert_allclose(
    group.weight, np.where(out.mask, out.pi_hat - group.draft_pi_hat.mean(-1), 0), atol=1e-7
  )
  np.testing.assert_allclose(group.draft_pi_hat[0, 0], [2 / 3, 2.5 / 3, 0.5 / 3], rtol=1e-6)
  assert group.weight[0, 0] == pytest.approx(2 / 3 - (2 / 3 + 2.5 / 3 + 0.5 / 3) / 3)
  with pytest.raises(ValueError, match="needs sim"):
    reward.build_reward_arrays(sim, pi_bar, form="group")
