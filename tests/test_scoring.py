"""Tests for omniopd_jax.scoring: hand-computed similarities, failures as NaN, the real MiniLM."""

import ml_collections
import numpy as np
import pytest

from omniopd_jax.reward import similarity as scoring


def test_edit_similarity_hand_values():
  assert scoring.edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
  assert scoring.edit_similarity("", "") == 1.0
  assert scoring.edit_similarity("abc", "") == 0.0
  assert scoring.edit_similarity("x = 7", "x = 7") == 1.0
  assert scoring.edit_similarity("3+4=7", "3+4=8") == pytest.approx(0.8)


def test_exact_match_hand_values():
  assert scoring.exact_match(" 8\nAnswe", " 8\nAnswe") == 1.0
  assert scoring.exact_match(" 8\nAnswe", " 9\nAnswe") == 0.0  # one digit: full disagreement
  assert scoring.exact_match("7 +  8", "7 +\n8") == 1.0  # runs of whitespace are equal
  assert scoring.exact_match("78", "7 8") == 0.0  # but whitespace is not dropped
  out = scoring.ExactMatchScorer().score(["a b", "c"], [["a  b", None, "ab"], ["c", "", "d"]])
  np.testing.assert_array_equal(out, [[1.0, np.nan, 0.0], [1.0, np.nan, 0.0]])


def test_rouge1_hand_values():
  assert scoring.rouge_tokens("2x+3=7. The Cat") == ["2x", "+", "3", "=", "7", ".", "the", "cat"]
  assert scoring.rouge1_f1("The cat sat.", "the cat ran.") == pytest.approx(6 / 8)
  assert scoring.rouge1_f1("2x+3=7", "2x + 3 = 8") == pytest.approx(8 / 10)
  assert scoring.rouge1_f1("a a a", "a") == pytest.approx(2 * 1 / 4)  # clipped counts
  assert scoring.rouge1_f1("", "") == 1.0
  assert scoring.rouge1_f1("x", "") == 0.0
  assert scoring.rouge1_f1("foo bar", "baz") == 0.0


@pytest.mark.parametrize("scorer", [scoring.EditDistanceScorer(), scoring.Rouge1Scorer()])
def test_string_scorers_shape_nan_and_values(scorer):
  student = ["x = 7", "so the answer is 10"]
  teacher = [["x = 7", None, "x = 8"], ["", "so the answer is 10", "   "]]
  out = scorer.score(student, teacher)
  assert out.shape == (2, 3) and out.dtype == np.float32
  nan = np.isnan(out)
  np.testing.assert_array_equal(
    nan, [[False, True, False], [True, False, True]]
  )  # None / empty fail
  assert out[0, 0] == 1.0 and out[1, 1] == 1.0
  assert 0.0 <= out[0, 2] < 1.0
  with pytest.raises(ValueError, match="same length"):
    scorer.score(["a", "b"], [["a"], ["b", "c"]])
  with pytest.raises(ValueError, match="teacher lists"):
    scorer.score(["a"], [])
  assert scorer.score([], []).shape == (0, 0)


def test_embedding_scorer_with_hand_vectors():
  vectors = {"a": [1.0, 0.0], "b": [3.0, 4.0], "c": [-2.0, 0.0], "d": [0.0, 0.0]}
  calls = []

  def encode(texts):
    calls.append(list(texts))
    return np.array([vectors[t] for t in texts])

  scorer = scoring.EmbeddingScorer(encode)
  out = scorer.score(["a", "b", "a"], [["b", "c", None], ["b", "a", "d"], ["a", "", "a"]])
  assert len(calls) == 1 and sorted(calls[0]) == ["a", "b", "c", "d"]  # each distinct text once
  expected = np.array([[0.6, 0.0, np.nan], [1.0, 0.6, 0.0], [1.0, np.nan, 1.0]], np.float32)
  np.testing.assert_allclose(out, expected, atol=1e-6)  # NaNs compared as equal
  assert out.dtype == np.float32
  calls.clear()
  assert np.isnan(scorer.score(["a"], [[None, ""]])).all() and not calls  # nothing to encode
  with pytest.raises(ValueError, match="encode_fn returned"):
    scoring.EmbeddingScorer(lambda texts: np.zeros((1, 2))).score(["a"], [["b"]])


def test_phi_floor_rescales_and_keeps_failures():
  inner = scoring.EditDistanceScorer()
  floored = scoring.make_scorer({"phi": "edit", "phi_floor": 0.75})
  assert isinstance(floored, scoring.FlooredScorer)
  student, teacher = ["abcd", "abcd", "abcd"], [["abcd", None], ["abcx", "abxx"], ["", "wxyz"]]
  raw = inner.score(student, teacher)  # [[1, nan], [0.75, 0.5], [nan, 0]]
  out = floored.score(student, teacher)
  want = np.where(np.isnan(raw), np.nan, np.maximum(raw - 0.75, 0) / 0.25)
  np.testing.assert_allclose(out, want, atol=1e-6)
  assert out[0, 0] == pytest.approx(1.0) and out[1, 0] == 0.0 and np.isnan(out[2, 0])
  assert isinstance(scoring.make_scorer({"phi": "edit", "phi_floor": 0.0}), type(inner))
  with pytest.raises(ValueError, match="phi_floor"):
    scoring.make_scorer({"phi": "edit", "phi_floor": 1.0})


def test_make_scorer_choices():
  assert isinstance(scoring.make_scorer({"phi": "edit"}), scoring.EditDistanceScorer)
  assert isinstance(
    scoring.make_scorer(ml_collections.ConfigDict({"phi": "rouge1"})), scoring.Rouge1Scorer
  )
  assert isinstance(scoring.make_scorer({"phi": "exact"}), scoring.ExactMatchScorer)
  with pytest.raises(ValueError, match="Unknown phi"):
    scoring.make_scorer({"phi": "bleu"})
  with pytest.raises(ValueError, match="embedding_backend"):
    scoring.make_scorer({"phi": "embedding", "embedding_backend": "onnx"})


@pytest.fixture(scope="module")
def minilm():
  """The real offline all-MiniLM-L6-v2 through make_scorer (loaded once for the module)."""
  scorer = scoring.make_scorer(
    ml_collections.ConfigDict({"phi": "embedding", "embedding_backend": "sentence_transformers"})
  )
  assert isinstance(scorer, scoring.EmbeddingScorer)
  return scorer


def test_minilm_scores(minilm):
  student = ["Then 3 + 4 = 7, so x = 7.", "The capital of France is Paris."]
  teacher = [
    [
      "Then 3 + 4 = 7, so x = 7.",
      "Adding 3 and 4 gives 7, hence x is 7.",
      "I like to eat bananas on the beach.",
      None,
    ],
    [
      "Paris is the capital of France.",
      "",
      "Quantum chromodynamics describes quarks.",
      "France's capital: Paris.",
    ],
  ]
  out = minilm.score(student, teacher)
  assert out.shape == (2, 4) and out.dtype == np.float32
  assert np.isnan(out[0, 3]) and np.isnan(out[1, 1])
  ok = out[~np.isnan(out)]
  assert np.all((ok >= 0.0) & (ok <= 1.0))
  assert out[0, 0] == pytest.approx(1.0, abs=1e-5)  # identical text
  assert out[0, 1] > out[0, 2] + 0.3 and out[1, 0] > out[1, 2] + 0.3  # paraphrase >> unrelated
  # Same numbers as encoding each pair directly.
  emb = minilm.encode_fn([student[1], teacher[1][3]])
  assert out[1, 3] == pytest.approx(float(np.clip(emb[0] @ emb[1], 0, 1)), abs=1e-5)


def test_flax_backend_matches_sentence_transformers(minilm):
  flax_scorer = scoring.make_scorer({"phi": "embedding", "embedding_backend": "flax"})
  student = ["Then 3 + 4 = 7, so x = 7.", "The answer is 10."]
  teacher = [["Adding 3 and 4 gives 7.", None], ["So we get 10.", "Bananas."]]
  np.testing.assert_allclose(
    flax_scorer.score(student, teacher), minilm.score(student, teacher), atol=2e-3
  )


def test_batch_sensitive_scorers_score_once_in_request_order_whatever_the_timing():
  """An encoder's cosine moves with its batch; the collector must not let teacher timing choose
  the batches (a resumed step would then score differently). Pairwise scorers still go in waves."""
  import concurrent.futures
  import threading
  import types

  from omniopd_jax.methods import overlap

  class BatchSensitive:
    batch_invariant = False

    def __init__(self):
      self.calls = []

    def score(self, student, teacher):
      self.calls.append(list(student))
      return np.full((len(student), len(teacher[0])), 1.0 / len(student), np.float32)

  class Pairwise(BatchSensitive):
    batch_invariant = True

  def run(scorer):
    futures = [concurrent.futures.Future() for _ in range(3)]
    sample = types.SimpleNamespace(text="z", ok=True, error="")
    futures[1].set_result([sample, sample])  # request 1 is back first, the others later
    timer = threading.Timer(0.3, lambda: [f.set_result([sample, sample]) for f in futures[::2]])
    timer.start()
    out = overlap.wait_and_score(futures, ["a", "b", "c"], scorer, 2)
    timer.join()
    return out[0], scorer.calls

  sim, calls = run(BatchSensitive())
  assert calls == [["a", "b", "c"]]  # one call, request order
  np.testing.assert_allclose(sim, 1.0 / 3)
  _, calls = run(Pairwise())
  assert calls[0] == ["b"] and sorted(sum(calls[1:], [])) == ["a", "c"]  # waves as they arrive
