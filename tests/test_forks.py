"""Tests for omniopd_jax.forks: entropy vs numpy, fork selection vs a plain-Python reference."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omniopd_jax.rollout import forks


def _reference_forks(entropy_row, mask_row, num_forks, chunk_len):
  """Plain-Python peak scheduler: scan positions by (entropy desc, position desc), keep fits."""
  length = int(sum(bool(m) for m in mask_row))
  candidates = [t for t in range(len(entropy_row)) if t + chunk_len <= length]
  candidates.sort(key=lambda t: (-float(entropy_row[t]), -t))
  chosen = []
  for t in candidates:
    if len(chosen) == num_forks:
      break
    if all(abs(t - u) >= chunk_len for u in chosen):
      chosen.append(t)
  return chosen


def _random_rows(rng, batch, length):
  """Rows of every awkward kind: ties (small integer entropies), all-equal, short, empty."""
  kind = rng.integers(0, 4, size=batch)
  ent = np.where(
    kind[:, None] == 0,
    rng.normal(size=(batch, length)),
    np.where(kind[:, None] == 1, rng.integers(0, 3, size=(batch, length)), 1.5),
  ).astype(np.float32)
  ent[kind == 3] = rng.integers(0, 2, size=(int((kind == 3).sum()), length))
  lengths = rng.integers(0, length + 1, size=batch)
  lengths[: batch // 10] = rng.integers(0, 4, size=batch // 10)  # many rows shorter than C
  mask = np.arange(length)[None, :] < lengths[:, None]
  ent[~mask] = rng.normal(size=int((~mask).sum())) * 10  # garbage beyond the row must not matter
  return ent, mask


@pytest.mark.parametrize("num_forks,chunk_len", [(1, 1), (4, 3), (3, 7), (8, 2)])
def test_select_forks_matches_reference(num_forks, chunk_len):
  rng = np.random.default_rng(num_forks * 100 + chunk_len)
  ent, mask = _random_rows(rng, batch=1500, length=29)
  starts, valid = forks.select_forks(
    jnp.asarray(ent), jnp.asarray(mask), num_forks=num_forks, chunk_len=chunk_len
  )
  starts, valid = np.asarray(starts), np.asarray(valid)
  assert starts.shape == valid.shape == (1500, num_forks)
  assert starts.dtype == np.int32 and valid.dtype == np.bool_
  for b in range(ent.shape[0]):
    expected = _reference_forks(ent[b], mask[b], num_forks, chunk_len)
    got = list(starts[b][valid[b]])
    assert got == expected, (b, ent[b], mask[b], got, expected)
    # Valid slots come first, unfilled ones are False with start 0.
    assert list(valid[b]) == [True] * len(expected) + [False] * (num_forks - len(expected))
    assert np.all(starts[b][~valid[b]] == 0)


def test_select_forks_hand_examples():
  ent = jnp.array([[0.0, 5.0, 5.0, 1.0, 9.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
  mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
  starts, valid = forks.select_forks(ent, mask, num_forks=3, chunk_len=2)
  # Row 0: 4 (9.0), then tie 5.0 at 1 and 2 -> the later, 2; 2 vs 4 fine (>= 2); then 0.
  assert np.asarray(starts).tolist()[0] == [4, 2, 0]
  assert np.asarray(valid).tolist()[0] == [True, True, True]
  # Row 1: T=4, starts <= 2, all tied -> 2 then 0, third slot empty.
  assert np.asarray(starts).tolist()[1] == [2, 0, 0]
  assert np.asarray(valid).tolist()[1] == [True, True, False]


def test_select_forks_nan_and_all_masked():
  ent = jnp.array([[jnp.nan, 1.0, 0.5], [1.0, 2.0, 3.0]])
  mask = jnp.array([[1, 1, 1], [0, 0, 0]], bool)
  starts, valid = forks.select_forks(ent, mask, num_forks=3, chunk_len=1)
  assert np.asarray(starts).tolist() == [[1, 2, 0], [0, 0, 0]]
  assert np.asarray(valid).tolist() == [[True, True, True], [False, False, False]]


def test_select_forks_random_is_valid_maximal_and_uniform():
  with pytest.raises(ValueError, match="rng"):
    forks.select_forks(
      jnp.zeros((1, 5)), jnp.ones((1, 5), bool), num_forks=1, chunk_len=1, method="random"
    )
  rng = np.random.default_rng(0)
  ent, mask = _random_rows(rng, batch=800, length=23)
  starts, valid = forks.select_forks(
    jnp.asarray(ent),
    jnp.asarray(mask),
    num_forks=3,
    chunk_len=4,
    method="random",
    rng=jax.random.key(1),
  )
  starts, valid = np.asarray(starts), np.asarray(valid)
  for b in range(ent.shape[0]):
    length = int(mask[b].sum())
    chosen = list(starts[b][valid[b]])
    assert all(t + 4 <= length for t in chosen)
    assert all(abs(t - u) >= 4 for i, t in enumerate(chosen) for u in chosen[:i])
    if len(chosen) < 3:  # stopped early only because nothing else fits
      free = [t for t in range(length - 3) if all(abs(t - u) >= 4 for u in chosen)]
      assert not free, (b, chosen, length)
  # Slot 0 is uniform over the fitting starts: one row, many keys.
  row_ent = jnp.asarray(np.arange(10, dtype=np.float32)[None, :].repeat(400, 0))
  row_mask = jnp.ones((400, 10), bool)
  counts = collections.Counter()
  for seed in range(5):
    s, _ = forks.select_forks(
      row_ent, row_mask, num_forks=1, chunk_len=3, method="random", rng=jax.random.key(seed)
    )
    counts.update(np.asarray(s)[:, 0].tolist())
  assert set(counts) == set(range(8))  # every start t <= 7 occurs; peak would always give 7
  assert min(counts.values()) > 2000 / 8 * 0.6 and max(counts.values()) < 2000 / 8 * 1.4


def test_select_forks_compiles_once_per_static_config():
  ent = jnp.zeros((4, 16))
  mask = jnp.ones((4, 16), bool)
  forks.select_forks(ent, mask, num_forks=2, chunk_len=3)
  before = forks.select_forks._cache_size()
  forks.select_forks(ent + 1.0, mask.at[0, 5:].set(False), num_forks=2, chunk_len=3)
  assert forks.select_forks._cache_size() == before


def test_token_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 17)) * 4
  logits[0, 0, :3] = -np.inf  # masked vocabulary entries contribute 0
  logits[1, 1] = 1e4 + rng.normal(size=17)  # large offsets must not overflow
  got = np.asarray(forks.token_entropy(jnp.asarray(logits, jnp.bfloat16)))
  z = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
  z = z - z.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  expected = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  uniform = forks.token_entropy(jnp.zeros((2, 8), jnp.bfloat16))
  np.testing.assert_allclose(np.asarray(uniform), np.log(8.0), rtol=1e-6)


def test_fork_metrics():
  ent = jnp.array([[1.0, 3.0, jnp.nan], [2.0, 2.0, 2.0]])
  mask = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
  starts = jnp.array([[1, 0], [0, 0]], jnp.int32)
  valid = jnp.array([[True, False], [False, False]])
  m = {k: float(v) for k, v in forks.fork_metrics(ent, mask, starts, valid).items()}
  assert m["forks/entropy_mean"] == pytest.approx(10.0 / 5)
  assert m["forks/entropy_at_forks"] == pytest.approx(3.0)
  assert m["forks/num_forks_mean"] == pytest.approx(0.5)
  assert m["forks/rows_without_forks"] == pytest.approx(0.5)


def test_select_forks_on_a_sharded_batch():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  rng = np.random.default_rng(5)
  ent, mask = _random_rows(rng, batch=16, length=12)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  starts, valid = forks.select_forks(
    jax.device_put(jnp.asarray(ent), sharding),
    jax.device_put(jnp.asarray(mask), sharding),
    num_forks=2,
    chunk_len=3,
  )
  for b in range(16):
    assert list(np.asarray(starts)[b][np.asarray(valid)[b]]) == _reference_forks(
      ent[b], mask[b], 2, 3
    )


def test_token_logprobs_and_entropy_match_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(2, 6))
  logp, ent = forks.logprob_and_entropy(jnp.asarray(logits), jnp.asarray(targets))
  z = logits.astype(np.float64)
  ref = z - z.max(-1, keepdims=True)
  ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))  # [2, 6, 11] log-probs
  np.testing.assert_allclose(
    np.asarray(logp), np.take_along_axis(ref, targets[..., None], -1)[..., 0], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(np.asarray(ent), -(np.exp(ref) * ref).sum(-1), rtol=1e-5, atol=1e-6)
