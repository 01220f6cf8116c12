"""Tests for evaluate: metrics from a scripted generate_fn, JSON output, and the command line end
to end on a tiny random HF Llama with the demo's character tokenizer."""

import json
import os
import subprocess
import sys

import pytest

from omniopd_jax.data import prompts as data
from omniopd_jax.data import tasks
from omniopd_jax.eval import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
  return tasks.make_char_tokenizer()


def _examples():
  return [
    {"question": f"{i} + {i} =", "answer": str(2 * i), "task": "chain_sum", "metadata": {}}
    for i in range(1, 6)
  ]


# Per example: greedy answer right?, then the k=4 sampled answers as offsets from the gold (None =
# a response with no number at all; "x.0" = the gold written as a decimal).
SCRIPT = [
  (True, [0, 0, 1, 1]),  # tie 2-2: the answer seen first (right) wins the vote
  (False, [1, 0, 1, 2]),  # pass@4 but the majority is wrong
  (False, [None, None, None, 0]),  # the only vote is right
  (True, [1, 1, 1, 1]),  # greedy right, every sample wrong
  (False, ["x.0", 0, 3, 3]),  # "10.0" and "10" are one vote: 2-2 tie, right one first
]


class ScriptedGenerate:
  """A generate_fn that answers from SCRIPT, recognising each example by its prompt."""

  def __init__(self, tokenizer, examples):
    self.tok = tokenizer
    self.by_prompt = {}
    cfg = data.default_config()
    for i, ex in enumerate(examples):
      self.by_prompt[tuple(data.render_prompt(tokenizer, ex["question"], cfg)[0])] = i
    self.examples = examples
    self.sample_counts = [0] * len(examples)
    self.calls = []

  def _text(self, i, offset):
    gold = int(self.examples[i]["answer"])
    if offset is None:
      return "I cannot tell."
    if offset == "x.0":
      return f"so\nAnswer: {gold}.0"
    return f"{gold} - 0 = {gold + offset}\nAnswer: {gold + offset}"

  def __call__(self, prompts, max_new_tokens, temperature, seed):
    self.calls.append((len(prompts), max_new_tokens, temperature, seed))
    out = []
    for prompt in prompts:
      i = self.by_prompt[tuple(prompt)]
      greedy_right, samples = SCRIPT[i]
      if temperature == 0.0:
        text = self._text(i, 0 if greedy_right else 5)
      else:
        text = self._text(i, samples[self.sample_counts[i]])
        self.sample_counts[i] += 1
      ids = self.tok.encode(text, add_special_tokens=False)
      out.append([*ids, self.tok.eos_token_id, 0, 0])  # padding after EOS is ignored
    return out


def test_metrics_from_scripted_responses(tok, tmp_path):
  examples = _examples()
  generate = ScriptedGenerate(tok, examples)
  out = tmp_path / "eval" / "step_0.json"
  metrics = evaluate.evaluate(
    generate,
    tok,
    examples,
    num_samples=4,
    temperature=0.7,
    max_new_tokens=32,
    batch_size=3,
    out_path=str(out),
  )
  assert metrics["eval/pass@1"] == pytest.approx(2 / 5)
  assert metrics["eval/pass@4"] == pytest.approx(4 / 5)
  assert metrics["eval/maj@4"] == pytest.approx(3 / 5)
  assert metrics["eval/sample_accuracy"] == pytest.approx(6 / 20)
  assert metrics["eval/num_examples"] == 5
  greedy_lens = [
    len(generate._text(i, 0 if SCRIPT[i][0] else 5)) + 1 for i in range(5)
  ]  # characters + EOS
  assert metrics["eval/response_len"] == pytest.approx(sum(greedy_lens) / 5)
  # 5 greedy rows in batches of 3, then 20 sampled rows in batches of 3; seeds differ per batch
  assert [c[0] for c in generate.calls] == [3, 2] + [3] * 6 + [2]
  assert {c[2] for c in generate.calls[:2]} == {0.0} and {c[2] for c in generate.calls[2:]} == {0.7}
  assert {c[1] for c in generate.calls} == {32}
  assert len({c[3] for c in generate.calls[2:]}) == 7
  saved = json.loads(out.read_text())
  assert saved["metrics"] == metrics
  assert saved["examples"][1]["greedy_correct"] == 0.0
  assert saved["examples"][1]["sample_correct"] == [0.0, 1.0, 0.0, 0.0]
  assert saved["examples"][4]["sample_answers"] == ["10.0", "10", "13", "13"]
  assert saved["examples"][2]["majority_correct"] == 1.0


def test_greedy_only_and_errors(tok):
  examples = _examples()
  metrics = evaluate.evaluate(
    ScriptedGenerate(tok, examples), tok, examples, max_new_tokens=8, batch_size=64
  )
  assert metrics["eval/pass@1"] == pytest.approx(2 / 5)
  assert not any(key.startswith(("eval/pass@4", "eval/maj")) for key in metrics)
  with pytest.raises(ValueError, match="returned 0 responses for 5"):
    evaluate.evaluate(lambda *a: [], tok, examples, max_new_tokens=8, batch_size=64)
  with pytest.raises(ValueError, match="no examples"):
    evaluate.evaluate(lambda *a: [], tok, [], max_new_tokens=8, batch_size=64)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tok):
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.LlamaConfig(
    vocab_size=len(tok),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
    pad_token_id=tok.pad_token_id,
  )
  path = tmp_path_factory.mktemp("tiny_llama")
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  tok.save_pretrained(path)
  return str(path)


CONFIG_FILE = """
import ml_collections
from omniopd_jax.data import prompts as data
from omniopd_jax.eval import evaluate

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = data.default_config()
  c.data.update(instruction="", size=50, eval_size=6)
  c.eval = evaluate.default_config()
  c.eval.update(num_examples=4, num_samples=2, max_new_tokens=6, batch_size=4)
  return c
"""


def _run_cli(args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run(
    [sys.executable, "-m", "omniopd_jax.eval.evaluate", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_end_to_end(tiny_model_dir, tmp_path):
  config_path = tmp_path / "eval_config.py"
  config_path.write_text(CONFIG_FILE)
  out = tmp_path / "results.json"
  proc = _run_cli(
    [f"--model={tiny_model_dir}", f"--config={config_path}", "--num_examples=3", f"--out={out}"]
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "eval/pass@1:" in proc.stdout and "eval/maj@2:" in proc.stdout
  saved = json.loads(out.read_text())
  assert saved["metrics"]["eval/num_examples"] == 3  # --num_examples beats config.eval
  assert saved["settings"] == {"num_samples": 2, "temperature": 1.0, "max_new_tokens": 6, "seed": 0}
  assert 1 <= saved["metrics"]["eval/response_len"] <= 6
  assert len(saved["examples"]) == 3 and len(saved["examples"][0]["sample_correct"]) == 2


def test_cli_with_the_project_config(tiny_model_dir, tmp_path):
  """configs/math.py:smoke drives the CLI once config.data / config.eval carry our fields."""
  sys.path.insert(0, ROOT)
  try:
    from omniopd_jax.configs import math as math_config
  finally:
    sys.path.remove(ROOT)
  config = math_config.get_config("smoke")
  missing = set(data.default_config()) - set(config.data)
  used = {"num_examples", "num_samples", "temperature", "max_new_tokens", "batch_size"}
  missing |= {f"eval.{k}" for k in used - set(config.eval)}
  assert not missing, f"configs/math.py lacks data/eval fields {sorted(missing)}"
  out = tmp_path / "results.json"
  proc = _run_cli(
    [
      f"--model={tiny_model_dir}",
      "--config=configs/math.py:smoke",
      "--config.eval.max_new_tokens=4",
      "--config.eval.num_samples=1",
      "--num_examples=2",
      f"--out={out}",
    ]
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(out.read_text())["metrics"]["eval/num_examples"] == 2


def test_missing_model_dir_is_a_clear_error(tmp_path):
  config_path = tmp_path / "eval_config.py"
  config_path.write_text(CONFIG_FILE)
  proc = _run_cli([f"--model={tmp_path / 'nope'}", f"--config={config_path}"])
  assert proc.returncode != 0 and "config.json does not exist" in proc.stderr
