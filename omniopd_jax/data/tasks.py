"""Demo task pieces: worked step-by-step solutions of reasoning-gym arithmetic problems, a
character-level HF tokenizer with a chat template, and (prompt, response) SFT pairs.

  tok = tasks.make_char_tokenizer()
  tasks.worked_solution(example)  # "4 + 13 = 17\\n17 - 5 = 12\\nAnswer: 12"
  tasks.worked_solution(example, "shifted")  # "4+13=17; 17-5=12\\nAnswer: 12" (style-shift)
  pairs = tasks.sft_examples(config.data, tok, n=1000, seed=0)  # [(prompt_ids, response_ids)]
"""

import re
import string

import numpy as np

from omniopd_jax.data import prompts as data

WORKED_TASKS = ("chain_sum", "basic_arithmetic")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0, 1, 2, 3
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"

# The user turn reads "Q: ...", the generation prompt "A: "; an assistant turn ends in <eos>.
CHAT_TEMPLATE = (
  "{{ bos_token }}"
  "{% for message in messages %}"
  "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
  "{% elif message['role'] == 'user' %}Q: {{ message['content'] }}\n"
  "{% else %}A: {{ message['content'] }}{{ eos_token }}\n"
  "{% endif %}"
  "{% endfor %}"
  "{% if add_generation_prompt %}A: {% endif %}"
)

_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")


# ----------------------------------------------------------------------------- worked solutions


class _Steps:
  """Recursive-descent evaluator of an integer expression that records each operation it does."""

  def __init__(self, expression: str):
    self.tokens = self._tokenize(expression)
    self.pos = 0
    self.lines: list[str] = []
    self.steps: list[tuple] = []  # (a, op, b, value), or ("-()", inner, value): for rendering

  @staticmethod
  def _tokenize(expression: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(expression.rstrip()):
      match = _TOKEN.match(expression, pos)
      if not match:
        raise ValueError(f"cannot read {expression!r} at position {pos}")
      tokens.append(match.group(1))
      pos = match.end()
    return tokens

  def _peek(self):
    return self.tokens[self.pos] if self.pos < len(self.tokens) else None

  def _take(self):
    self.pos += 1
    return self.tokens[self.pos - 1]

  def _record(self, a, op, b, value):
    self.steps.append((a, op, b, value))
    self.lines.append(f"{_fmt(a)} {op} {_fmt(b)} = {_fmt(value)}")
    return value

  def expr(self):
    value = self.term()
    while self._peek() in ("+", "-"):
      op = self._take()
      rhs = self.term()
      value = self._record(value, op, rhs, value + rhs if op == "+" else value - rhs)
    return value

  def term(self):
    value = self.unary()
    while self._peek() in ("*", "/"):
      op = self._take()
      rhs = self.unary()
      if op == "/" and rhs == 0:
        raise ValueError("division by zero")
      # reasoning-gym evaluates "/" as Python's floor division "//" (exact in ~99% of problems).
      value = self._record(value, op, rhs, value * rhs if op == "*" else value // rhs)
    return value

  def unary(self):
    token = self._take()
    if token == "-":
      if self._peek() == "(":
        inner = self.unary()
        self.lines.append(f"-({_fmt(inner)}) = {_fmt(-inner)}")
        self.steps.append(("-()", inner, -inner))
        return -inner
      return -self.unary()  # a negative literal such as -33: no step of its own
    if token == "(":
      value = self.expr()
      if self._take() != ")":
        raise ValueError("unbalanced parentheses")
      return value
    if not token.isdigit():
      raise ValueError(f"unexpected {token!r}")
    return int(token)


def _fmt(value: int) -> str:
  return str(value)


def _solve(example: dict) -> tuple[_Steps, str]:
  task = example.get("task")
  if task not in WORKED_TASKS:
    raise ValueError(f"worked solutions exist for {WORKED_TASKS}, not {task!r}")
  expression = example["metadata"]["expression"]
  steps = _Steps(expression)
  value = steps.expr()
  if steps.pos != len(steps.tokens):
    raise ValueError(f"trailing tokens in {expression!r}")
  answer = _fmt(value)
  if answer != str(example["answer"]).strip():
    raise ValueError(
      f"{expression!r} evaluates to {answer}, but the gold answer is {example['answer']}"
    )
  return steps, answer


def worked_solution(example: dict, style: str = "student") -> str:
  """Step-by-step solution of a chain_sum / basic_arithmetic example, one operation a line, then
  "Answer: X". For "4 + 13 - 5 =": "4 + 13 = 17\\n17 - 5 = 12\\nAnswer: 12". `style` "shifted":
  the same steps in the style-shift teacher's surface form, "4+13=17; 17-5=12\\nAnswer: 12"."""
  if style != "student":
    return "".join(text for text, _ in solution_segments(example, style))
  steps, answer = _solve(example)
  lines = steps.lines or [f"{example['metadata']['expression']} = {answer}"]  # one line at least
  return "\n".join([*lines, f"Answer: {answer}"])


# ----------------------------------------------------------------------------- style shift

# Separators of each surface form. The shifted one differs from the student's at the first
# character of every separator (" " vs the operator, " " vs "=", "\\n" vs ";"), so a teacher that
# writes it gives the student's own correct tokens there a low probability; the numbers, the step
# order and the final "Answer: X" line (what the grader reads) are the same.
STYLES = {
  "student": dict(op=" {} ", eq=" = ", line="\n"),
  "shifted": dict(op="{}", eq="=", line="; "),
}
ANSWER_SEP = "\nAnswer: "


def solution_segments(example: dict, style: str) -> list[tuple[str, str]]:
  """The worked solution in `style` as (text, kind) segments, kind "num" (a number: the same text
  in every style) or "sep" (everything between numbers). The segments of two styles align one to
  one, which is what lets `style_shift_pair` switch style at any segment."""
  if style not in STYLES:
    raise ValueError(f"style {style!r}: choose from {sorted(STYLES)}")
  sep = STYLES[style]
  steps, answer = _solve(example)
  segments: list[tuple[str, str]] = []
  for i, step in enumerate(steps.steps):
    if i:
      segments.append((sep["line"], "sep"))
    if step[0] == "-()":
      segments += [("-(", "sep"), (_fmt(step[1]), "num"), (")", "sep"), (sep["eq"], "sep")]
    else:
      a, op, b, _ = step
      segments += [(_fmt(a), "num"), (sep["op"].format(op), "sep"), (_fmt(b), "num"),
                   (sep["eq"], "sep")]  # fmt: skip
    segments.append((_fmt(step[-1]), "num"))
  if not steps.steps:  # a lone number
    segments += [(example["metadata"]["expression"].strip(), "num"), (sep["eq"], "sep"),
                 (answer, "num")]  # fmt: skip
  return [*segments, (ANSWER_SEP, "sep"), (answer, "num")]


def style_shift_pair(example: dict, rng, own_style_fraction: float = 0.3) -> tuple[str, str]:
  """(prefix, continuation) that teaches the style-shift teacher to continue a *student's* solution
  in its own style: the prefix is the first segments of the solution, each in the student's style
  or the shifted one (mostly the student's: what the teacher sees at a fork), possibly cut inside
  its last segment; the continuation finishes that segment as begun and writes every later segment
  in the shifted style. With probability `own_style_fraction` the prefix is empty (the whole
  solution in the teacher's own style). Only the continuation is trained on."""
  student = solution_segments(example, "student")
  shifted = solution_segments(example, "shifted")
  if rng.random_sample() < own_style_fraction:
    return "", "".join(text for text, _ in shifted)
  cut = rng.randint(1, len(student) + 1)  # segments begun in the prefix
  student_share = 1.0 if rng.random_sample() < 0.5 else rng.random_sample()
  prefix = [(s if rng.random_sample() < student_share else t)[0]
            for s, t in zip(student[:cut], shifted[:cut])]  # fmt: skip
  rest = ""
  last = prefix[-1]
  if len(last) > 1 and rng.random_sample() < 0.5:  # stop inside the last segment
    k = rng.randint(1, len(last))
    prefix[-1], rest = last[:k], last[k:]
  return "".join(prefix), rest + "".join(text for text, _ in shifted[cut:])


# ----------------------------------------------------------------------------- tokenizer


def make_char_tokenizer():
  """A character-level transformers tokenizer: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then digits,
  letters, ASCII punctuation, space and newline. encode() adds no special tokens; the chat template
  starts with <bos>. save_pretrained / AutoTokenizer.from_pretrained round-trips it."""
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers

  vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *CHARS])}
  backend = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  # One token per character (newlines included); decoding concatenates them with no spaces.
  backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
  backend.decoder = decoders.Fuse()
  tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=backend,
    pad_token="<pad>",
    bos_token="<bos>",
    eos_token="<eos>",
    unk_token="<unk>",
  )
  tokenizer.chat_template = CHAT_TEMPLATE
  return tokenizer


# ----------------------------------------------------------------------------- SFT pairs


def sft_examples(
  data_cfg,
  tokenizer,
  n: int,
  seed: int,
  style: str = "student",
  cuts_per_problem: int = 4,
  held_out: set[str] | None = None,
) -> list[tuple[list[int], list[int]]]:
  """n (prompt ids, response ids) pairs: reasoning-gym problems of `data_cfg` (generator `seed`)
  rendered as data.py renders prompts, answered by their worked solution followed by EOS.

  Problems in `held_out` (questions; default data_cfg's held-out eval split) are skipped, so
  evaluation stays held out. `style` "shifted": `cuts_per_problem` pairs a problem, each a
  `style_shift_pair` whose prefix joins the prompt (so only the continuation in the shifted style
  is trained on).
  """
  if style not in STYLES:
    raise ValueError(f"style {style!r}: choose from {sorted(STYLES)}")
  if tokenizer.eos_token_id is None:
    raise ValueError("the tokenizer has no eos_token: responses must end in one")
  if held_out is None:
    held_out = {example["question"] for example in data.load_examples(data_cfg, "eval")}
  cfg = data_cfg.copy_and_resolve_references()
  cfg.seed = seed
  cfg.size = 2 * n
  while True:  # grow the generated set until n problems remain outside the held-out split
    kept = [ex for ex in data.load_examples(cfg, "train") if ex["question"] not in held_out]
    if len(kept) >= n or cfg.size >= 64 * n:
      break
    cfg.size *= 4
  if len(kept) < n:
    raise ValueError(f"only {len(kept)} of {cfg.size} problems are outside the held-out split")
  pairs = []
  rng = np.random.RandomState(seed)
  for example in kept[:n]:
    prompt_ids, _ = data.render_prompt(tokenizer, example["question"], data_cfg)
    if style == "student":
      texts = [("", worked_solution(example))]
    else:
      texts = [style_shift_pair(example, rng) for _ in range(cuts_per_problem)]
    for prefix, response in texts:
      prefix_ids = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
      response_ids = tokenizer.encode(response, add_special_tokens=False)
      pairs.append(([*prompt_ids, *prefix_ids], [*response_ids, tokenizer.eos_token_id]))
  return pairs
