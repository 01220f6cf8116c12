"""experiments/signal_quality.py: token labels against the gold, the AUC against a brute force, the
host twin of the centred weights, and the whole measurement on :smoke's tiny pair (real served
teacher, real collection)."""

import json
import os
import subprocess
import sys

import numpy as np

from omniopd_jax.experiments import demo_models
from omniopd_jax.experiments import signal_quality as sq
from omniopd_jax.reward import posterior


def test_token_labels_mark_the_first_wrong_token_and_what_follows():
  tok = demo_models.make_tokenizer()
  gold = "4 + 13 = 17\n17 - 5 = 12\nAnswer: 12"
  wrong = tok.encode("4 + 13 = 18\n18 - 5 = 13", add_special_tokens=False)
  pad = [tok.pad_token_id] * 3
  labels = sq.token_labels(tok, np.array(wrong + pad), np.arange(len(wrong) + 3) < len(wrong), gold)
  assert labels[:10].tolist() == [sq.RIGHT] * 10 and labels[10] == sq.WRONG
  assert (labels[11:] == sq.AFTER).all()
  right = tok.encode(gold, add_special_tokens=False) + [tok.eos_token_id]
  labels = sq.token_labels(tok, np.array(right + pad), np.arange(len(right) + 3) < len(right), gold)
  assert (labels == sq.RIGHT).all()


def test_auc_matches_a_brute_force_with_ties():
  rng = np.random.RandomState(0)
  scores = rng.randint(0, 5, 60).astype(float)
  positive = rng.rand(60) < 0.4
  pairs = [(a > b) + 0.5 * (a == b) for a in scores[positive] for b in scores[~positive]]
  assert sq.auc(scores, positive) == np.mean(pairs)
  assert np.isnan(sq.auc(scores, np.ones(60, bool)))


def test_centred_token_weights_are_the_update_centring():
  sim = np.array([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [np.nan, np.nan]]], np.float32)
  pi_bar = np.full((2, 2), 0.5, np.float32)
  rewards = posterior.build_reward_arrays(sim, pi_bar, form="centered")
  got = sq.centred_token_weights(rewards, 3)
  pi = rewards.pi_hat[rewards.mask]
  want = np.where(rewards.mask, rewards.pi_hat - pi.mean(), 0.0)[..., None].repeat(3, -1)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_quick_measurement_runs_end_to_end(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run(
    [sys.executable, "-m", "omniopd_jax.experiments.signal_quality", f"--workdir={tmp_path}",
     "--quick"], capture_output=True, text=True, env=env, timeout=600,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.load(open(tmp_path / "signal_quality.json"))
  assert set(results) >= {f"edit@0.9/{c}" for c in posterior.TOKEN_CREDITS}
  assert "| edit/decision |" in out.stdout
  for row in results.values():
    assert row["chunks"] + row["off_gold_chunks"] > 0 and 0.0 <= row["forced_mass"] <= 1.0
