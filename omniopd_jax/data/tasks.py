"""Demo task pieces: worked step-by-step solutions of reasoning-gym arithmetic problems, a
character-level HF tokenizer with a chat template, and (prompt, response) SFT pairs.

  tok = tasks.make_char_tokenizer()
  tasks.worked_solution(example)  # "4 + 13 = 17\\n17 - 5 = 12\\nAnswer: 12"
  pairs = tasks.sft_examples(config.data, tok, n=1000, seed=0)  # [(prompt_ids, response_ids)]
"""

import re
import string

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


def worked_solution(example: dict) -> str:
  """Step-by-step solution of a chain_sum / basic_arithmetic example, one operation a line, then
  "Answer: X". For "4 + 13 - 5 =": "4 + 13 = 17\\n17 - 5 = 12\\nAnswer: 12"."""
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
  lines = steps.lines or [f"{expression} = {answer}"]  # a lone number still gets one line
  return "\n".join([*lines, f"Answer: {answer}"])


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


def sft_examples(data_cfg, tokenizer, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
  """n (prompt ids, response ids) pairs: reasoning-gym problems of `data_cfg` (generator `seed`)
  rendered as data.py renders prompts, answered by their worked solution followed by EOS.

  Problems in data_cfg's held-out eval split are skipped, so evaluation stays held out.
  """
  if tokenizer.eos_token_id is None:
    raise ValueError("the tokenizer has no eos_token: responses must end in one")
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
  for example in kept[:n]:
    prompt_ids, _ = data.render_prompt(tokenizer, example["question"], data_cfg)
    response = tokenizer.encode(worked_solution(example), add_special_tokens=False)
    pairs.append((prompt_ids, [*response, tokenizer.eos_token_id]))
  return pairs
