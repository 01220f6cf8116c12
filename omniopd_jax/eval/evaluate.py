"""Held-out evaluation: greedy pass@1, sampled pass@k and maj@k, mean response length; as a
library function over any `generate_fn` and as a command line over an HF model directory.

  python -m omniopd_jax.eval.evaluate --model HF_DIR --config=configs/math.py:demo \
      [--num_examples 200] [--out results.json]
"""

import collections
import concurrent.futures
import decimal
import json
import os
import time
from collections.abc import Callable, Sequence

import ml_collections

from omniopd_jax.data import grading
from omniopd_jax.data import prompts as data

# generate_fn(prompt_ids_list, max_new_tokens, temperature, seed) -> response token ids per prompt
GenerateFn = Callable[[list[list[int]], int, float, int], list[list[int]]]


def default_config() -> ml_collections.ConfigDict:
  """The evaluation section of a config (`config.eval`)."""
  c = ml_collections.ConfigDict()
  c.num_examples = 256  # held-out problems evaluated (0 = the whole eval split)
  c.num_samples = 1  # k sampled responses per problem; k > 1 adds pass@k and maj@k
  c.temperature = 1.0  # temperature of the k samples (pass@1 is always greedy)
  c.max_new_tokens = 0  # response budget (0 = rollout.max_new_tokens)
  c.batch_size = 64  # responses generated per call
  c.every = 100  # training steps between evaluations (0 = only before and after training)
  return c


def _response(ids: Sequence[int], tokenizer) -> tuple[str, int]:
  """(decoded text, length in tokens) of a response, cut after its first EOS."""
  ids = list(ids)
  eos = tokenizer.eos_token_id
  if eos is not None and eos in ids:
    ids = ids[: ids.index(eos) + 1]
  return tokenizer.decode(ids, skip_special_tokens=True), len(ids)


def _vote_key(answer: str | None) -> str | None:
  """Canonical form for majority voting: "12", "12.0" and "+12" are one vote."""
  if answer is None:
    return None
  try:
    value = decimal.Decimal(answer.replace(",", ""))
  except decimal.InvalidOperation:
    return " ".join(answer.split())
  if not value.is_finite():
    return answer
  return str(int(value)) if value == value.to_integral_value() else str(value.normalize())


def _generate_all(generate_fn, prompts, rows, *, max_new_tokens, temperature, batch_size, seed):
  """Generate one response per row (a prompt index) in batches; yields (batch rows, responses)."""
  for start in range(0, len(rows), batch_size):
    batch = rows[start : start + batch_size]
    responses = generate_fn(
      [prompts[i] for i in batch], max_new_tokens, temperature, seed + start // batch_size
    )
    if len(responses) != len(batch):
      raise ValueError(f"generate_fn returned {len(responses)} responses for {len(batch)} prompts")
    yield batch, responses


def evaluate(
  generate_fn: GenerateFn,
  tokenizer,
  examples: Sequence[dict],
  *,
  num_samples: int = 1,
  temperature: float = 1.0,
  max_new_tokens: int,
  batch_size: int,
  data_cfg=None,
  seed: int = 0,
  out_path: str | None = None,
) -> dict[str, float]:
  """Grade `generate_fn`'s responses to `examples` (data.py examples) and return the metrics.

  eval/pass@1 is greedy (temperature 0). With num_samples = k > 1, k responses per problem are
  also sampled at `temperature`: eval/pass@k (any of the k correct), eval/maj@k (the most common
  extracted answer is correct) and eval/sample_accuracy (mean over the k). Prompts are rendered as
  data.render_prompt does with `data_cfg` (default: data.default_config()). Grading runs on a
  thread, overlapped with the next batch's generation. With `out_path`, the metrics and every
  response go there as JSON.
  """
  if not examples:
    raise ValueError("no examples to evaluate")
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1")
  data_cfg = data_cfg if data_cfg is not None else data.default_config()
  start_time = time.time()
  prompts = [data.render_prompt(tokenizer, ex["question"], data_cfg)[0] for ex in examples]
  n = len(examples)

  def grade_batch(batch, responses):
    out = []
    for i, ids in zip(batch, responses):
      text, length = _response(ids, tokenizer)
      out.append((i, text, length, grading.grade(text, examples[i])))
    return out

  def run(rows, temperature_, seed_):
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      futures = [
        pool.submit(grade_batch, batch, responses)
        for batch, responses in _generate_all(
          generate_fn,
          prompts,
          rows,
          max_new_tokens=max_new_tokens,
          temperature=temperature_,
          batch_size=batch_size,
          seed=seed_,
        )
      ]
      return [record for future in futures for record in future.result()]

  greedy = run(list(range(n)), 0.0, seed)
  records = [
    {
      "question": ex["question"],
      "answer": ex["answer"],
      "task": ex["task"],
      "greedy_response": text,
      "greedy_correct": score,
    }
    for ex, (_, text, _, score) in zip(examples, greedy)
  ]
  metrics = {
    "eval/num_examples": float(n),
    "eval/pass@1": sum(r[3] for r in greedy) / n,
    "eval/response_len": sum(r[2] for r in greedy) / n,
  }
  if num_samples > 1:
    sampled = run([i for i in range(n) for _ in range(num_samples)], temperature, seed + 1_000_003)
    metrics.update(_sampled_metrics(sampled, records, num_samples))
  metrics["eval/time_s"] = time.time() - start_time
  if out_path:
    settings = {"num_samples": num_samples, "temperature": temperature,
                "max_new_tokens": max_new_tokens, "seed": seed}  # fmt: skip
    _write_json(out_path, {"metrics": metrics, "settings": settings, "examples": records})
  return metrics


def _sampled_metrics(sampled, records: list[dict], k: int) -> dict[str, float]:
  """eval/pass@k, maj@k, sample_accuracy, sample_response_len from (i, text, length, score)
  records of k samples per problem; fills each problem's record with its samples' answers."""
  n = len(records)
  per_example = collections.defaultdict(list)
  for i, text, length, score in sampled:
    per_example[i].append((text, length, score))
  pass_k = maj_k = 0.0
  for i, samples in per_example.items():
    answers = [grading.extract_answer(text) for text, _, _ in samples]
    votes = collections.Counter(key for key in map(_vote_key, answers) if key is not None)
    majority_correct = 0.0
    if votes:
      winner = votes.most_common(1)[0][0]  # ties go to the answer seen first
      first = next(j for j, a in enumerate(answers) if _vote_key(a) == winner)
      majority_correct = samples[first][2]
    pass_k += max(score for _, _, score in samples)
    maj_k += majority_correct
    records[i]["sample_answers"] = answers
    records[i]["sample_correct"] = [score for _, _, score in samples]
    records[i]["majority_correct"] = majority_correct
  return {
    f"eval/pass@{k}": pass_k / n,
    f"eval/maj@{k}": maj_k / n,
    "eval/sample_accuracy": sum(r[3] for r in sampled) / len(sampled),
    "eval/sample_response_len": sum(r[2] for r in sampled) / len(sampled),
  }


def _write_json(path: str, obj) -> None:
  """Atomically: a reader never sees half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def sampler_generate_fn(
  model, tokenizer, mesh=None, *, eos_ids=None, rules=None, prompt_len: int | None = None
) -> GenerateFn:
  """A generate_fn over rollout.sampler for a Flax model (the one used by training and the CLI).

  Stops at `eos_ids` (default: the tokenizer's EOS). With `prompt_len`, prompts are
  left-truncated to it and padded to exactly it: one static shape for every call (and process).
  """
  from omniopd_jax import sharding
  from omniopd_jax.rollout import sampler

  if eos_ids is None:
    eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

  def generate_fn(prompts, max_new_tokens, temperature, seed):
    if prompt_len is not None:
      prompts, _ = data.left_truncate(prompts, prompt_len)
    rollout = sampler.generate(
      model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
      eos_ids=eos_ids, pad_id=pad_id, mesh=mesh, rules=rules or sharding.DEFAULT_RULES,
      prompt_len=prompt_len,
    )  # fmt: skip
    return [row[mask].tolist() for row, mask in zip(rollout.tokens, rollout.mask)]

  return generate_fn


def eval_settings(config) -> dict:
  """evaluate() keyword arguments from a full config (config.eval, config.data, rollout)."""
  max_new_tokens = config.eval.max_new_tokens
  if not max_new_tokens:
    max_new_tokens = config.rollout.max_new_tokens if "rollout" in config else 0
  if max_new_tokens < 1:
    raise ValueError("set config.eval.max_new_tokens (or config.rollout.max_new_tokens) to >= 1")
  return dict(
    num_samples=config.eval.num_samples,
    temperature=config.eval.temperature,
    max_new_tokens=max_new_tokens,
    batch_size=config.eval.batch_size,
    data_cfg=config.data,
    seed=config.get("seed", 0),
  )


def main(argv):
  del argv
  from absl import flags

  from omniopd_jax.models import hf

  config = flags.FLAGS.config
  model_dir = flags.FLAGS.model
  model, tokenizer = hf.load_pretrained(model_dir)
  if tokenizer is None:
    raise ValueError(f"{model_dir} has no tokenizer files: save the tokenizer beside the model")
  examples = data.load_examples(config.data, "eval")
  num_examples = flags.FLAGS.num_examples or config.eval.num_examples
  if num_examples:
    examples = examples[:num_examples]
  out = flags.FLAGS.out or os.path.join(model_dir, "eval.json")
  metrics = evaluate(
    sampler_generate_fn(model, tokenizer),
    tokenizer,
    examples,
    out_path=out,
    **eval_settings(config),
  )
  for key, value in metrics.items():
    print(f"{key}: {value:.4f}")
  print(f"wrote {out}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/math.py:demo")
  flags.DEFINE_string("model", None, "HF model directory (config.json, safetensors, tokenizer)")
  flags.DEFINE_integer("num_examples", 0, "held-out problems to evaluate (0 = config.eval's)")
  flags.DEFINE_string("out", "", "results JSON (default: MODEL/eval.json)")
  flags.mark_flags_as_required(["config", "model"])
  app.run(main)
