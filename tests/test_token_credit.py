"""Token credit inside a chunk (omniopd.token_credit): where each teacher sample leaves the
student's chunk, the per-token counts and posterior, and how the update spreads and centres the
per-token weights, against brute-force references."""

import jax
import numpy as np
import pytest

from omniopd_jax.configs import math as math_config
from omniopd_jax.configs import validate
from omniopd_jax.methods import base, omniopd
from omniopd_jax.reward import posterior


def brute_divergence(text, ends, z):
  """The first token t whose text text[:ends[t]] is not a prefix of z."""
  if z is None:
    return len(ends)
  for t, e in enumerate(ends):
    if not z.startswith(text[:e]):
      return t
  return len(ends)


def test_divergence_tokens_match_a_brute_force():
  rng = np.random.RandomState(0)
  for _ in range(300):
    pieces = ["".join(rng.choice(list("ab "), rng.randint(0, 3))) for _ in range(5)]  # 5 tokens
    text = "".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])  # empty tokens too (an EOS decodes to "")
    zs = [None, *("".join(rng.choice(list("ab "), rng.randint(0, 9))) for _ in range(4)),
          text, text[:4]]  # fmt: skip
    got = posterior.divergence_tokens(text, ends, zs)
    assert got.tolist() == [brute_divergence(text, ends, z) for z in zs], (pieces, zs)


@pytest.mark.parametrize("mode", ["prefix", "decision"])
def test_token_agreement_matches_a_brute_force(mode):
  rng = np.random.RandomState(1)
  c, n = 6, 5
  sim = rng.rand(4, 3, n).astype(np.float32)
  sim[rng.rand(4, 3, n) < 0.3] = np.nan
  diverge = rng.randint(0, c + 1, size=(4, 3, n))
  k, n_valid = posterior.token_agreement(sim, diverge, c, mode)
  want_k, want_n = np.zeros((4, 3, c)), np.zeros((4, 3, c), int)
  for idx in np.ndindex(4, 3):
    for t in range(c):
      for j in range(n):
        phi, d = sim[idx][j], diverge[idx][j]
        if np.isnan(phi) or (mode == "decision" and t > d):
          continue
        want_n[idx][t] += 1
        want_k[idx][t] += 1.0 if t < d else phi
  np.testing.assert_allclose(k, want_k, rtol=1e-6)
  np.testing.assert_array_equal(n_valid, want_n)


def test_reward_arrays_credit_the_deciding_token():
  """' 53\\n53 -' against three samples ' 73\\n73 -' (phi 0) and one copy of it (phi 1)."""
  student = " 53\n53 -"
  ends = np.arange(1, len(student) + 1)  # one character per token
  zs = [" 73\n73 -"] * 3 + [student]
  diverge = posterior.divergence_tokens(student, ends, zs)
  assert diverge.tolist() == [1, 1, 1, 8]
  sim = np.array([[[0.0, 0.0, 0.0, 1.0]]], np.float32)  # [B=1, M=1, N=4]
  pi_bar = np.array([[0.5]], np.float32)
  got = {
    mode: posterior.build_reward_arrays(
      sim, pi_bar, form="centered", token_credit=mode, diverge=diverge[None, None], chunk_len=8
    )
    for mode in ("none", "prefix", "decision")
  }
  assert got["none"].token_weight is None
  np.testing.assert_allclose(got["none"].weight, [[(1 + 0.5) / 5]])
  # decision: ' ' agreed by all 4; '5' decided by 3 samples at phi 0 and agreed by 1; the tokens
  # after it are spoken for only by the sample that reproduced them.
  np.testing.assert_allclose(got["decision"].token_weight[0, 0], [0.9, 0.3] + [0.75] * 6, rtol=1e-6)
  np.testing.assert_allclose(got["prefix"].token_weight[0, 0], [0.9] + [0.3] * 7, rtol=1e-6)
  assert got["decision"].token_mask.all()
  np.testing.assert_allclose(got["decision"].weight, got["none"].weight)  # the chunk's own stays
  metrics = posterior.reward_metrics(got["decision"])
  assert metrics["omniopd/token_credit_frac"] == 1.0
  with pytest.raises(ValueError, match="diverge of shape"):
    posterior.build_reward_arrays(sim, pi_bar, token_credit="decision")


def test_token_weights_spread_and_centre_on_device_like_a_loop():
  rng = np.random.RandomState(2)
  b, m, c, length = 3, 2, 4, 12
  starts = np.array([[0, 6], [2, 8], [5, 0]], np.int32)
  valid = np.array([[True, True], [True, False], [True, False]])
  token_weight = rng.rand(b, m, c).astype(np.float32)
  token_mask = rng.rand(b, m, c) < 0.6
  got_w, got_a = omniopd.chunk_token_weights(
    starts, valid, np.zeros((b, m)), c, length, token_weight, token_mask
  )
  want_w, want_a = np.zeros((b, length)), np.zeros((b, length), bool)
  for i, j in np.ndindex(b, m):
    for t in range(c):
      if valid[i, j] and token_mask[i, j, t]:
        want_w[i, starts[i, j] + t] = token_weight[i, j, t]
        want_a[i, starts[i, j] + t] = True
  np.testing.assert_allclose(np.asarray(got_w), want_w, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(got_a), want_a)

  config = math_config.get_config("smoke")
  config.omniopd.update(weight_form="centered", token_credit="decision", num_forks=m, chunk_len=c)
  seq = base.Sequences(*(np.zeros((b, length), np.int32) for _ in range(4)))
  batch = omniopd.OmniOPDBatch(seq, starts, valid, np.zeros((b, m), np.float32),
                               token_weight, token_mask)  # fmt: skip
  centred = jax.jit(lambda x: omniopd.center_fork_weights(config, x))(batch)
  counted = token_mask & valid[..., None]
  want = np.where(counted, token_weight - token_weight[counted].mean(), 0.0)
  np.testing.assert_allclose(np.asarray(centred.fork_token_weight), want, atol=1e-6)
  # The abstract batch the compile-only paths use has the real batch's structure.
  abstract = omniopd.abstract_batch(config, b, 0, length)
  assert jax.tree.structure(abstract) == jax.tree.structure(batch)
  assert abstract.fork_token_weight.shape == (b, m, c)


def test_token_credit_config_is_validated():
  config = math_config.get_config("smoke")
  config.omniopd.token_credit = "decison"
  assert any("did you mean 'decision'" in p for p in validate.problems(config))
  config.omniopd.update(token_credit="prefix", weight_form="group")
  assert any("not 'group'" in p for p in validate.problems(config))
