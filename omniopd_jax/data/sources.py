"""Where problems come from: reasoning-gym (procedural), local JSONL/Parquet files and prepared TFDS
datasets. Each source is a random-access sequence of raw rows plus a row -> Example converter;
every row is checked once when the source is loaded (rows.py).
"""

import json
from collections.abc import Callable, Sequence
from typing import Any

from omniopd_jax.data import rows as row_checks
from omniopd_jax.data import tfds_source

SOURCES = ("reasoning_gym", "jsonl", "parquet", "tfds")
SPLITS = ("train", "eval")

Example = dict[str, Any]  # {"question": str, "answer": str, "task": str, "metadata": dict}


def _answer_field(cfg) -> str:
  if cfg.answer_field:
    return cfg.answer_field
  return "short_answer" if cfg.source == "tfds" and cfg.tfds_name == "gsm8k" else "answer"


def _max_chars(cfg) -> int:
  return int(cfg.get("max_chars", 0) or 0)


def make_example(row, question_field, answer_field, task, metadata, cfg) -> Example:
  """The Example of a raw row, or rows.BadRowError when its question or answer is unusable."""
  question = row_checks.text_field(
    row, question_field, "question", max_chars=_max_chars(cfg), numbers_ok=False
  )
  answer = row_checks.text_field(
    row, answer_field, "answer", max_chars=_max_chars(cfg), numbers_ok=True
  ).strip()
  if cfg.extract_gold:
    from omniopd_jax.data import grading

    answer = grading.extract_answer(answer) or answer
  return {"question": question, "answer": answer, "task": task, "metadata": metadata}


def _checked(cfg, rows, convert, where: Callable[[int], str], name: str):
  return row_checks.check_rows(
    rows, convert, where, skip=bool(cfg.get("skip_bad_rows", False)), name=name
  )


# ----------------------------------------------------------------------------- reasoning-gym


def _task_list(cfg) -> list[str]:
  names = cfg.tasks.split(",") if isinstance(cfg.tasks, str) else list(cfg.tasks)
  tasks = [t.strip() for t in names if t.strip()]
  if not tasks:
    raise ValueError("data.tasks is empty: name at least one reasoning-gym task, e.g. 'chain_sum'")
  from omniopd_jax.data import grading

  unknown = [t for t in tasks if not grading.is_reasoning_gym_task(t)]
  if unknown:
    raise ValueError(
      f"data.tasks: {unknown} are not reasoning-gym tasks (e.g. chain_sum, products)"
    )
  return tasks


def _task_kwargs(cfg, task: str) -> dict:
  kwargs = cfg.task_kwargs.get(task) if cfg.get("task_kwargs") else None
  if kwargs is None:
    return {}
  return kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)


def _reasoning_gym_dataset(cfg, size: int, seed: int):
  import reasoning_gym
  from reasoning_gym import composite

  tasks = _task_list(cfg)
  for task in tasks:  # reasoning-gym checks its kwargs with TypeError / assert: say where they are
    try:
      reasoning_gym.create_dataset(task, size=1, seed=0, **_task_kwargs(cfg, task))
    except (TypeError, AssertionError, ValueError) as e:
      raise ValueError(f"data.task_kwargs.{task} is not valid for reasoning-gym: {e}") from e
  if len(tasks) == 1:
    return reasoning_gym.create_dataset(
      tasks[0], size=size, seed=seed, **_task_kwargs(cfg, tasks[0])
    )
  weights = cfg.task_weights.split(",") if isinstance(cfg.task_weights, str) else cfg.task_weights
  weights = [float(w) for w in weights if str(w).strip()] or [1.0] * len(tasks)
  if len(weights) != len(tasks):
    raise ValueError(f"data.task_weights has {len(weights)} weights for {len(tasks)} tasks")
  specs = [
    composite.DatasetSpec(name=t, weight=w, config=_task_kwargs(cfg, t))
    for t, w in zip(tasks, weights)
  ]
  return reasoning_gym.create_dataset("composite", size=size, seed=seed, datasets=specs)


def _rg_example(cfg) -> Callable[[dict], Example]:
  default_task = _task_list(cfg)[0]  # once: the check imports reasoning-gym's registry

  def convert(item):
    metadata = json.loads(json.dumps(item.get("metadata", {}), default=str))  # tuples -> lists
    task = metadata.get("source_dataset") or default_task
    return make_example(item, "question", "answer", task, metadata, cfg)

  return convert


def _reasoning_gym_train(cfg):
  dataset, convert = _reasoning_gym_dataset(cfg, cfg.size, cfg.seed), _rg_example(cfg)
  name = f"reasoning-gym {cfg.tasks} (seed {cfg.seed})"
  rows = _checked(cfg, dataset, convert, lambda i: f"{name} row {i}", name)
  return rows, convert


def _reasoning_gym_eval(cfg) -> list[Example]:
  """eval_size problems from unused generator seeds that are not among the training problems."""
  train_questions = {item["question"] for item in _reasoning_gym_dataset(cfg, cfg.size, cfg.seed)}
  if cfg.eval_exclude_size:  # problems another stage trained on (the demo pair's SFT problems)
    excluded = _reasoning_gym_dataset(cfg, cfg.eval_exclude_size, cfg.eval_exclude_seed)
    train_questions.update(item["question"] for item in excluded)
  want = cfg.eval_size or 1000
  convert = _rg_example(cfg)
  # Problem i of a reasoning-gym dataset comes from Random(seed + i): seed + size starts the
  # first generator stream that the training problems did not use. `eval_seed` moves the held-out
  # stream elsewhere (problems equal to a training one are skipped either way).
  seed = cfg.eval_seed if cfg.eval_seed >= 0 else cfg.seed + cfg.size
  dataset = _reasoning_gym_dataset(cfg, max(4 * want, 64), seed)
  name = f"reasoning-gym {cfg.tasks} (held out, seed {seed})"
  checked = _checked(cfg, dataset, convert, lambda i: f"{name} row {i}", name)
  out, seen = [], set()
  for item in checked:
    if item["question"] not in train_questions and item["question"] not in seen:
      seen.add(item["question"])
      out.append(convert(item))
      if len(out) == want:
        return out
  raise ValueError(
    f"only {len(out)} held-out reasoning-gym problems differ from the {cfg.size} training ones "
    f"(and the data.eval_exclude_size={cfg.eval_exclude_size} excluded ones) "
    f"(wanted eval_size={want}): make the tasks harder or lower data.size / data.eval_size"
  )


# ----------------------------------------------------------------------------- local files


def _file_examples(cfg, path: str) -> row_checks.CheckedRows:
  qf, af = cfg.question_field, _answer_field(cfg)
  pairs = row_checks.file_rows(path)
  if not pairs:
    raise ValueError(f"{path}: the file holds no problems")

  def convert(pair):
    where, row = pair
    return make_example(row, qf, af, cfg.task_name, {"source": where}, cfg)

  checked = _checked(cfg, pairs, convert, lambda i: pairs[i][0], path)
  return row_checks.CheckedRows([convert(pair) for pair in checked], None, checked.skipped)


# ----------------------------------------------------------------------------- TFDS


def _tfds_train_or_eval(cfg, split: str):
  rows = tfds_source.data_source(cfg, split)
  qf, af = cfg.question_field, _answer_field(cfg)
  name = f"TFDS {cfg.tfds_name}[{split}]"
  if len(rows):
    missing = [f for f in (qf, af) if f not in rows[0]]
    if missing:  # every row has the same features: a config error, never a skippable row
      raise ValueError(
        f"{name}: no feature {missing[0]!r} (has {sorted(rows[0])}); "
        "set data.question_field / data.answer_field"
      )

  def convert(row):
    return make_example(row, qf, af, cfg.task_name, {"tfds": cfg.tfds_name}, cfg)

  return _checked(cfg, rows, convert, lambda i: f"{name} row {i}", name), convert


# ----------------------------------------------------------------------------- dispatch


def source(cfg, split: str) -> tuple[Sequence, Callable[[Any], Example]]:
  """(random-access sequence of checked raw rows, row -> Example) for a split."""
  if cfg.source not in SOURCES:
    raise ValueError(f"data.source={cfg.source!r} is not one of {SOURCES}")
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}")
  identity = lambda example: example
  if cfg.source == "reasoning_gym":
    if split == "eval":
      return _reasoning_gym_eval(cfg), identity
    return _reasoning_gym_train(cfg)
  if cfg.source in ("jsonl", "parquet"):
    if split == "eval" and cfg.eval_path:
      return _file_examples(cfg, cfg.eval_path), identity
    examples = _file_examples(cfg, cfg.train_path)
    if cfg.eval_path or cfg.eval_size <= 0:
      return examples, identity
    if len(examples) <= cfg.eval_size:
      raise ValueError(
        f"{cfg.train_path} has {len(examples)} usable problems, not more than eval_size="
        f"{cfg.eval_size}: set data.eval_path or lower data.eval_size"
      )
    if split == "eval":
      return examples[-cfg.eval_size :], identity
    return row_checks.CheckedRows(examples[: -cfg.eval_size], None, examples.skipped), identity
  return _tfds_train_or_eval(cfg, cfg.tfds_split if split == "train" else cfg.tfds_eval_split)


def load_examples(data_cfg, split: str) -> list[Example]:
  """All examples of a split ("train" or "eval"; eval is capped at data_cfg.eval_size)."""
  rows, convert = source(data_cfg, split)
  n = len(rows)
  if split == "eval" and data_cfg.eval_size > 0:
    n = min(n, data_cfg.eval_size)
  return [convert(rows[i]) for i in range(n)]


def num_skipped(rows: Sequence) -> int:
  """Bad rows left out of a training source (held-out lists report theirs when loaded)."""
  return len(getattr(rows, "skipped", ()))
