"""Tests for grading: answer extraction, reasoning-gym scoring, math-verify, thread safety."""

import concurrent.futures

import pytest

from omniopd_jax.data import grading


@pytest.mark.parametrize(
  "text, expected",
  [
    ("4 + 13 = 17\n17 - 5 = 12\nAnswer: 12", "12"),
    ("**Answer:** 12.", "12"),
    ("The final answer is: -3", "-3"),
    ("Answer: 1\nwait, no.\nAnswer: 2", "2"),  # the last Answer line wins
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{{2}+1}", "{2}+1"),  # nested braces balanced
    ("Final answer: $\\boxed{7}$", "7"),
    ("Answer: $x^2$", "x^2"),
    ("She pays 3 * 4 = 12.\n#### 1,234", "1234"),
    ("<answer> 9 </answer> and 10", "9"),
    ("x is 3 and then 4,500 apples", "4500"),  # last number, thousands comma dropped
    ("minus 0.5 or -2.25", "-2.25"),
    ("no numbers here", None),
    ("truncated \\boxed{12", "12"),  # unbalanced box: falls back to the last number
    ("", None),
  ],
)
def test_extract_answer(text, expected):
  assert grading.extract_answer(text) == expected


def _ex(answer, task, **metadata):
  return {"question": "q", "answer": answer, "task": task, "metadata": metadata}


@pytest.mark.parametrize(
  "response, example, expected",
  [
    ("1 + 5 = 6\nAnswer: 6", _ex("6", "chain_sum"), 1.0),
    ("Answer: 7", _ex("6", "chain_sum"), 0.0),
    ("Answer: 6.0", _ex("6", "chain_sum"), 1.0),  # chain_sum's scorer tolerates decimals
    ("no answer at all", _ex("6", "chain_sum"), 0.0),
    ("Answer: -61", _ex("-61", "basic_arithmetic"), 1.0),
    # reasoning-gym gives partial credit (2/5) to "-61 m": binarised, that is wrong
    ("Answer: -61 m", _ex("-61", "basic_arithmetic"), 0.0),
    ("\\boxed{171790}", _ex("171790", "products"), 1.0),
    ("The result is 100", _ex("100", "leg_counting"), 1.0),  # last number
    # math-verify for everything that is not a reasoning-gym task
    ("so \\boxed{0.5}", _ex("\\frac{1}{2}", "math"), 1.0),
    ("Answer: 1/2", _ex("\\frac{1}{2}", "math"), 1.0),
    ("Answer: 2", _ex("\\frac{1}{2}", "math"), 0.0),
    ("Answer: (x+1)^2", _ex("x^2+2x+1", "math"), 1.0),
    ("Answer: \\frac{\\sqrt3}{2}", _ex("\\frac{\\sqrt{3}}{2}", "math"), 1.0),
    ("... so in total 1,234 dollars.\n#### 1,234", _ex("1234", "gsm8k"), 1.0),
    ("I do not know", _ex("1234", "math"), 0.0),
  ],
)
def test_grade(response, example, expected):
  assert grading.grade(response, example) == expected


def test_grade_unparseable_gold_is_a_clear_error():
  with pytest.raises(ValueError, match="gold answer"):
    grading.grade("Answer: 1", _ex("\\\\", "math"))


@pytest.mark.parametrize("gold", ["", "  ", None, {"value": 6}, [6], True])
@pytest.mark.parametrize("task", ["chain_sum", "math"])
def test_grade_refuses_an_unusable_gold_answer(gold, task):
  # An empty gold used to reach the scorer; a wrong response must never be graded against it.
  with pytest.raises(ValueError, match="no usable gold answer"):
    grading.grade("Answer: 6", _ex(gold, task))


def test_grade_takes_numeric_gold():
  assert grading.grade("Answer: 6", _ex(6, "chain_sum")) == 1.0
  assert grading.grade("Answer: 0.5", _ex(0.5, "math")) == 1.0


def test_grade_in_threads():
  """math-verify's signal-based timeouts fail outside the main thread; ours are off."""
  cases = [("Answer: 0.5", _ex("\\frac{1}{2}", "math"), 1.0), ("Answer: 3", _ex("4", "math"), 0.0)]
  cases = cases * 8
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    scores = list(pool.map(lambda c: grading.grade(c[0], c[1]), cases))
  assert scores == [c[2] for c in cases]
