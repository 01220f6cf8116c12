"""Binary correctness of a response: final-answer extraction, then reasoning-gym's scorer for its
tasks and math-verify for everything else. Thread-safe (math-verify's signal timeouts are off)."""

import functools
import logging
import re
from typing import Any

# math-verify sees at most this many characters, since its own timeouts are off (they use
# signal.alarm, which fails outside the main thread); a bounded input keeps sympy bounded.
_MAX_VERIFY_CHARS = 300

_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_ANSWER_LINE = re.compile(
  r"^[ \t>*#_]*(?:the\s+)?(?:final\s+)?answer(?:\s+is)?[ \t*_]*[:：][ \t*_]*(.*?)[ \t*_]*$",
  re.IGNORECASE | re.MULTILINE,
)
_HASHES = re.compile(r"####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces balanced."""
  start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
  if start < 0:
    return None
  i = text.index("{", start) + 1
  depth = 1
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j]
  return None  # unbalanced: a truncated response


def _clean(answer: str) -> str:
  answer = answer.strip()
  boxed = _last_boxed(answer)
  if boxed is not None:
    answer = boxed.strip()
  for left, right in (("$", "$"), ("**", "**"), ("\\(", "\\)"), ("\\[", "\\]")):
    if len(answer) > len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
      answer = answer[len(left) : -len(right)].strip()
  answer = answer.rstrip(".").strip()
  return answer.replace(",", "") if _NUMBER.fullmatch(answer) else answer


def extract_answer(text: str) -> str | None:
  """The final answer in `text`, or None when there is none.

  Looks, in order, for the last `<answer>X</answer>`, the last `Answer: X` line, the last
  `\\boxed{X}`, the last `#### X`, and else the last number (thousands commas dropped).
  """
  for pattern in (_ANSWER_TAG, _ANSWER_LINE):
    matches = [m.group(1) for m in pattern.finditer(text) if m.group(1).strip()]
    if matches:
      return _clean(matches[-1]) or None
  boxed = _last_boxed(text)
  if boxed is not None and boxed.strip():
    return _clean(boxed) or None
  matches = [m.group(1) for m in _HASHES.finditer(text) if m.group(1).strip()]
  if matches:
    return _clean(matches[-1]) or None
  numbers = _NUMBER.findall(text)
  return numbers[-1].replace(",", "") if numbers else None


@functools.cache
def _reasoning_gym_tasks() -> frozenset[str]:
  from reasoning_gym import factory

  return frozenset(factory.DATASETS)


@functools.cache
def _rg_scorer(task: str):
  import reasoning_gym

  # Built once per task with its default config: the scorers read only the entry.
  return reasoning_gym.get_score_answer_fn(task)


def is_reasoning_gym_task(task: str) -> bool:
  return task in _reasoning_gym_tasks()


def _as_latex(text: str) -> str:
  return text if ("$" in text or "\\boxed" in text) else f"${text}$"


def _drop_timeout_warning(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith("Timeout is disabled")


@functools.cache
def _math_verify_module():
  import math_verify

  # We disable its timeouts on purpose (see _MAX_VERIFY_CHARS); its warning says so on every run.
  for name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(name).addFilter(_drop_timeout_warning)
  return math_verify


def _math_verify(predicted: str | None, response_text: str, gold: str) -> bool:
  math_verify = _math_verify_module()

  gold_parsed = math_verify.parse(_as_latex(gold), parsing_timeout=None)
  if not gold_parsed:
    raise ValueError(
      f"math-verify cannot parse the gold answer {gold!r}: give a plain number or LaTeX expression"
    )
  if predicted is not None:
    target = _as_latex(predicted[:_MAX_VERIFY_CHARS])
  else:
    target = response_text[-_MAX_VERIFY_CHARS:]  # let math-verify find an answer itself
  predicted_parsed = math_verify.parse(target, parsing_timeout=None)
  if not predicted_parsed:
    return False
  return bool(math_verify.verify(gold_parsed, predicted_parsed, timeout_seconds=None))


def grade(response_text: str, example: dict[str, Any]) -> float:
  """1.0 when the response's final answer matches `example["answer"]`, else 0.0.

  `example` is a data.py example: {"question", "answer", "task", "metadata"}. reasoning-gym tasks
  are scored by the task's own `score_answer` on the extracted answer (partial credit counts as
  wrong); all other tasks by math-verify against the gold answer.
  """
  gold = example.get("answer")
  if not isinstance(gold, (str, int, float)) or isinstance(gold, bool) or not str(gold).strip():
    raise ValueError(
      f"example {str(example.get('question', ''))[:60]!r} has no usable gold answer ({gold!r}); "
      "examples from data.load_examples are checked when loaded"
    )
  gold = str(gold)
  predicted = extract_answer(response_text)
  task = str(example.get("task", ""))
  if is_reasoning_gym_task(task):
    if predicted is None:
      return 0.0
    entry = {"question": example.get("question", ""), "answer": gold}
    entry["metadata"] = example.get("metadata") or {}
    score = _rg_scorer(task)(answer=predicted, entry=entry)
    return 1.0 if score >= 1.0 else 0.0
  return 1.0 if _math_verify(predicted, response_text, gold) else 0.0
