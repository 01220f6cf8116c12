"""Tests for the demo task pieces: worked solutions, the character tokenizer, SFT pairs."""

import re

import pytest
import transformers

from omniopd_jax.data import grading, tasks
from omniopd_jax.data import prompts as data

_STEP = re.compile(r"^(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)$")
_NEGATE = re.compile(r"^-\((-?\d+)\) = (-?\d+)$")


def _check_steps(solution: str):
  """Every line but the last is one correct integer operation; returns the step count."""
  *lines, last = solution.split("\n")
  ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
  for line in lines:
    if m := _STEP.match(line):
      a, op, b, c = m.groups()
      assert ops[op](int(a), int(b)) == int(c), line
    else:
      m = _NEGATE.match(line)
      assert m and -int(m.group(1)) == int(m.group(2)), line
  assert last.startswith("Answer: ")
  return len(lines)


def _config(task, size=300, **kwargs):
  cfg = data.default_config()
  cfg.tasks = task
  cfg.task_kwargs = {task: kwargs}
  cfg.size = size
  cfg.eval_size = 20
  cfg.instruction = ""
  return cfg


def test_worked_solution_of_the_docstring_example():
  example = {"task": "chain_sum", "answer": "12", "metadata": {"expression": "4 + 13 - 5"}}
  assert tasks.worked_solution(example) == "4 + 13 = 17\n17 - 5 = 12\nAnswer: 12"


@pytest.mark.parametrize(
  "task, kwargs",
  [
    ("chain_sum", dict(min_terms=3, max_terms=5, min_digits=1, max_digits=3)),
    ("basic_arithmetic", {}),  # parentheses, *, / (floor), negation
  ],
)
def test_worked_solutions_are_correct_and_graded_right(task, kwargs):
  examples = data.load_examples(_config(task, **kwargs), "train")
  num_steps = []
  for example in examples:
    solution = tasks.worked_solution(example)
    num_steps.append(_check_steps(solution))
    assert grading.grade(solution, example) == 1.0, (example["question"], solution)
    wrong = solution.rsplit("Answer: ", 1)[0] + f"Answer: {int(example['answer']) + 1}"
    assert grading.grade(wrong, example) == 0.0
  if task == "chain_sum":  # 3-5 terms: 2-4 operations each, long enough for several chunks
    assert min(num_steps) >= 2 and max(num_steps) == 4


def test_worked_solution_refuses_other_tasks_and_wrong_gold():
  with pytest.raises(ValueError, match="worked solutions exist"):
    tasks.worked_solution({"task": "products", "answer": "6", "metadata": {"expression": "2 * 3"}})
  with pytest.raises(ValueError, match="gold answer"):
    tasks.worked_solution({"task": "chain_sum", "answer": "7", "metadata": {"expression": "2 + 3"}})


def test_char_tokenizer_round_trips(tmp_path):
  tok = tasks.make_char_tokenizer()
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
  assert len(tok) == len(tasks.SPECIAL_TOKENS) + len(tasks.CHARS)
  text = tasks.CHARS + "4 + 13 = 17\n17 - 5 = 12\nAnswer: 12"
  ids = tok.encode(text, add_special_tokens=False)
  assert len(ids) == len(text)  # one token per character
  assert tok.decode(ids) == text
  assert tok.decode([1, *ids, 2, 0], skip_special_tokens=True) == text
  assert tok.encode("é", add_special_tokens=False) == [tok.unk_token_id]

  messages = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "4 + 3 ="}]
  prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert prompt == "<bos>Be exact.\nQ: 4 + 3 =\nA: "
  encoded = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  assert encoded["input_ids"] == [1, *tok.encode(prompt[len("<bos>") :], add_special_tokens=False)]
  full = tok.apply_chat_template(
    [*messages[1:], {"role": "assistant", "content": "7"}], tokenize=False
  )
  assert full == "<bos>Q: 4 + 3 =\nA: 7<eos>\n"

  tok.save_pretrained(tmp_path)
  reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert reloaded.get_vocab() == tok.get_vocab()
  assert reloaded.encode(text, add_special_tokens=False) == ids
  assert reloaded.decode(ids) == text
  assert reloaded.chat_template == tok.chat_template
  assert (
    reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt
  )
  assert (reloaded.pad_token, reloaded.bos_token, reloaded.eos_token) == ("<pad>", "<bos>", "<eos>")


def test_sft_examples():
  tok = tasks.make_char_tokenizer()
  cfg = _config("chain_sum", size=100, min_terms=2, max_terms=3, min_digits=1, max_digits=1)
  held_out = {ex["question"] for ex in data.load_examples(cfg, "eval")}
  pairs = tasks.sft_examples(cfg, tok, n=200, seed=7)
  assert len(pairs) == 200
  for prompt_ids, response_ids in pairs:
    prompt = tok.decode(prompt_ids, skip_special_tokens=True)
    assert prompt.startswith("Q: ") and prompt.endswith("\nA: ")
    question = prompt[len("Q: ") : -len("\nA: ")]
    assert question not in held_out  # 1-digit sums repeat a lot: the filter matters here
    assert prompt_ids == data.render_prompt(tok, question, cfg)[0]
    assert response_ids[-1] == tok.eos_token_id and tok.eos_token_id not in response_ids[:-1]
    response = tok.decode(response_ids, skip_special_tokens=True)
    answer = response.rsplit("Answer: ", 1)[1]
    terms = question.rsplit(": ", 1)[1].rstrip(" =")
    assert int(answer) == eval(terms)  # noqa: S307 (digits, + and - only)
