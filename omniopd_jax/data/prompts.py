"""Prompt data: reasoning-gym, local JSONL/Parquet and TFDS sources, chat-template rendering, and a
per-process, shuffled, checkpointable grain iterator of prompt batches.

  it = data.make_prompt_iterator(config.data, tokenizer, batch_size=8, seed=0)
  batch = next(it)  # {"prompt_ids": [[...]] * 8, "prompt_text": [...], "examples": [...]}
  state = it.get_state()  # JSON; it.set_state(state) resumes with identical batches
"""

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import ml_collections

SOURCES = ("reasoning_gym", "jsonl", "parquet", "tfds")
SPLITS = ("train", "eval")
LOCAL_TFDS_NAME = "omniopd_local_math"

Example = dict[str, Any]  # {"question": str, "answer": str, "task": str, "metadata": dict}


def default_config() -> ml_collections.ConfigDict:
  """The data section of a config (`config.data`)."""
  c = ml_collections.ConfigDict()
  c.source = "reasoning_gym"  # where problems come from: reasoning_gym, jsonl, parquet or tfds
  # reasoning-gym (procedural, offline)
  c.tasks = "chain_sum"  # comma-separated reasoning-gym task names; two or more make a composite
  c.task_weights = ""  # comma-separated sampling weights of `tasks` ("" = equal)
  c.task_kwargs = ml_collections.ConfigDict(  # difficulty kwargs per task name
    {"chain_sum": {"min_terms": 3, "max_terms": 4, "min_digits": 1, "max_digits": 2}}
  )
  c.size = 10_000  # distinct procedural training problems (one epoch)
  c.seed = 0  # generator seed of the training problems; held-out ones use seed + size onwards
  # local files (jsonl / parquet)
  c.train_path = ""  # JSONL or Parquet file of training problems
  c.eval_path = ""  # held-out file; "" holds out the last eval_size rows of train_path
  c.question_field = "question"  # field holding the problem text
  c.answer_field = (
    ""  # field holding the gold answer ("" = "short_answer" for gsm8k, else "answer")
  )
  c.extract_gold = False  # take the final answer out of the gold field ('#### N' solutions)
  c.task_name = "math"  # task of file/TFDS examples (graded with math-verify)
  # TFDS (prepared files only: nothing is ever downloaded)
  c.tfds_name = "gsm8k"  # builder name: gsm8k, or omniopd_local_math (see prepare_local_tfds)
  c.tfds_data_dir = ""  # directory holding the prepared array_record files
  c.tfds_split = "train"  # TFDS split used for training (slicing such as "train[:90%]" works)
  c.tfds_eval_split = "test"  # TFDS split used for held-out evaluation
  # prompts
  c.system_prompt = ""  # system message ("" = none)
  c.instruction = (  # appended to each question on a new line ("" = none)
    "Please reason step by step, and put your final answer within \\boxed{}."
  )
  # iteration
  c.num_epochs = 0  # passes over the training problems; 0 = repeat forever
  c.shuffle = True  # reshuffle the training problems every epoch
  c.eval_size = 200  # held-out problems (0 = the whole held-out split)
  c.prefetch = 2  # batches prepared ahead on a background thread (0 = none)
  return c


# ----------------------------------------------------------------------------- sources


def _answer_field(cfg) -> str:
  if cfg.answer_field:
    return cfg.answer_field
  return "short_answer" if cfg.source == "tfds" and cfg.tfds_name == "gsm8k" else "answer"


def _make_example(question, answer, task, metadata, cfg) -> Example:
  # TFDS text features come back as bytes.
  question, answer = (
    v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in (question, answer)
  )
  answer = answer.strip()
  if cfg.extract_gold:
    from omniopd_jax.data import grading

    answer = grading.extract_answer(answer) or answer
  return {"question": str(question), "answer": answer, "task": task, "metadata": metadata}


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
  def convert(item):
    metadata = json.loads(json.dumps(item.get("metadata", {}), default=str))  # tuples -> lists
    task = metadata.get("source_dataset") or _task_list(cfg)[0]
    return _make_example(item["question"], item["answer"], task, metadata, cfg)

  return convert


def _reasoning_gym_eval(cfg) -> list[Example]:
  """eval_size problems from unused generator seeds that are not among the training problems."""
  train_questions = {item["question"] for item in _reasoning_gym_dataset(cfg, cfg.size, cfg.seed)}
  want = cfg.eval_size or 1000
  convert = _rg_example(cfg)
  out, seen = [], set()
  # Problem i of a reasoning-gym dataset comes from Random(seed + i): seed + size starts the
  # first generator stream that the training problems did not use.
  dataset = _reasoning_gym_dataset(cfg, max(4 * want, 64), cfg.seed + cfg.size)
  for item in dataset:
    if item["question"] not in train_questions and item["question"] not in seen:
      seen.add(item["question"])
      out.append(convert(item))
      if len(out) == want:
        return out
  raise ValueError(
    f"only {len(out)} held-out reasoning-gym problems differ from the {cfg.size} training ones "
    f"(wanted eval_size={want}): make the tasks harder or lower data.size / data.eval_size"
  )


def _file_rows(path: str) -> list[tuple[str, dict]]:
  """(location, row) pairs of a JSONL or Parquet file, location like 'file.jsonl line 3'."""
  if not path:
    raise ValueError("data.train_path is empty: give a .jsonl or .parquet file of problems")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such data file (check data.train_path / data.eval_path)")
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq

    try:
      rows = pq.read_table(path).to_pylist()
    except Exception as e:
      raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
    return [(f"{path} row {i}", row) for i, row in enumerate(rows)]
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a readable UTF-8 JSONL file ({e})") from e
  out = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} line {lineno}: not valid JSON ({e.msg}); one object a line") from e
    if not isinstance(row, dict):
      raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
    out.append((f"{path} line {lineno}", row))
  return out


def _file_examples(cfg, path: str) -> list[Example]:
  qf, af = cfg.question_field, _answer_field(cfg)
  out = []
  for where, row in _file_rows(path):
    for field in (qf, af):
      if row.get(field) is None:
        raise ValueError(
          f"{where}: missing field {field!r} (has {sorted(row)}); set data.question_field / "
          "data.answer_field to the file's names"
        )
    out.append(_make_example(row[qf], row[af], cfg.task_name, {"source": where}, cfg))
  if not out:
    raise ValueError(f"{path}: the file holds no problems")
  return out


def _tfds():
  import tensorflow_datasets as tfds

  return tfds


def _tfds_source(cfg, split: str):
  """Random-access source of a prepared TFDS dataset; never downloads."""
  tfds = _tfds()
  data_dir = cfg.tfds_data_dir or os.path.expanduser("~/tensorflow_datasets")
  if cfg.tfds_name == "gsm8k":
    import tensorflow_datasets.text.gsm8k  # noqa: F401  (registers the builder)
  elif cfg.tfds_name == LOCAL_TFDS_NAME:
    _local_builder_class()
  builder = tfds.builder(cfg.tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    hint = (
      'prepare it once where the internet is reachable:\n  python -c "import tensorflow_datasets '
      f"as tfds; tfds.builder('{cfg.tfds_name}', data_dir='{data_dir}', file_format='array_record')"
      '.download_and_prepare()"'
    )
    if cfg.tfds_name == "gsm8k":
      hint += (
        "\nor from local copies of openai/grade-school-math's train.jsonl and test.jsonl:\n"
        f"  python -c \"from omniopd_jax import data; data.prepare_gsm8k('DIR', '{data_dir}')\""
      )
    elif cfg.tfds_name == LOCAL_TFDS_NAME:
      hint = f"prepare it with data.prepare_local_tfds({{'train': 'FILE.jsonl'}}, '{data_dir}')"
    raise FileNotFoundError(
      f"TFDS dataset {cfg.tfds_name!r} is not prepared under {builder.data_dir}; {hint}"
    )
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
      f"{builder.data_dir} holds {builder.info.file_format.value} files, which need TensorFlow; "
      "prepare the dataset again with file_format='array_record' (random access, no TensorFlow)"
    )
  return builder.as_data_source(split)


def _tfds_example(cfg, split: str) -> Callable[[dict], Example]:
  qf, af = cfg.question_field, _answer_field(cfg)

  def convert(row):
    for field in (qf, af):
      if field not in row:
        raise ValueError(
          f"TFDS {cfg.tfds_name}[{split}]: no feature {field!r} (has {sorted(row)}); "
          "set data.question_field / data.answer_field"
        )
    return _make_example(row[qf], row[af], cfg.task_name, {"tfds": cfg.tfds_name}, cfg)

  return convert


def _source(cfg, split: str) -> tuple[Sequence, Callable[[Any], Example]]:
  """(random-access sequence of raw rows, row -> Example) for a split."""
  if cfg.source not in SOURCES:
    raise ValueError(f"data.source={cfg.source!r} is not one of {SOURCES}")
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}")
  identity = lambda example: example
  if cfg.source == "reasoning_gym":
    if split == "eval":
      return _reasoning_gym_eval(cfg), identity
    return _reasoning_gym_dataset(cfg, cfg.size, cfg.seed), _rg_example(cfg)
  if cfg.source in ("jsonl", "parquet"):
    if split == "eval" and cfg.eval_path:
      return _file_examples(cfg, cfg.eval_path), identity
    examples = _file_examples(cfg, cfg.train_path)
    if cfg.eval_path or cfg.eval_size <= 0:
      return examples, identity
    if len(examples) <= cfg.eval_size:
      raise ValueError(
        f"{cfg.train_path} has {len(examples)} problems, not more than eval_size={cfg.eval_size}: "
        "set data.eval_path or lower data.eval_size"
      )
    held_out = examples[-cfg.eval_size :] if split == "eval" else examples[: -cfg.eval_size]
    return held_out, identity
  tfds_split = cfg.tfds_split if split == "train" else cfg.tfds_eval_split
  return _tfds_source(cfg, tfds_split), _tfds_example(cfg, tfds_split)


def load_examples(data_cfg, split: str) -> list[Example]:
  """All examples of a split ("train" or "eval"; eval is capped at data_cfg.eval_size)."""
  rows, convert = _source(data_cfg, split)
  n = len(rows)
  if split == "eval" and data_cfg.eval_size > 0:
    n = min(n, data_cfg.eval_size)
  return [convert(rows[i]) for i in range(n)]


# ----------------------------------------------------------------------------- TFDS preparation


_LOCAL_BUILDER = None


def _local_builder_class():
  """A GeneratorBasedBuilder over local JSONL files (registered as LOCAL_TFDS_NAME on first use)."""
  global _LOCAL_BUILDER
  if _LOCAL_BUILDER is not None:
    return _LOCAL_BUILDER
  tfds = _tfds()

  class OmniopdLocalMath(tfds.core.GeneratorBasedBuilder):
    """Math problems {question, answer} read from local JSONL files, one file per split."""

    name = LOCAL_TFDS_NAME
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, jsonl_paths=None, fields=("question", "answer"), **kwargs):
      self._jsonl_paths = dict(jsonl_paths or {})
      self._fields = fields
      super().__init__(**kwargs)

    def _info(self):
      text = tfds.features.Text()
      features = tfds.features.FeaturesDict({"question": text, "answer": text})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      if not self._jsonl_paths:
        raise ValueError(f"{LOCAL_TFDS_NAME} needs jsonl_paths={{split: file}} to be prepared")
      return {split: self._generate_examples(path) for split, path in self._jsonl_paths.items()}

    def _generate_examples(self, path):
      qf, af = self._fields
      for i, (where, row) in enumerate(_file_rows(path)):
        for field in (qf, af):
          if row.get(field) is None:
            raise ValueError(f"{where}: missing field {field!r} (has {sorted(row)})")
        yield i, {"question": str(row[qf]), "answer": str(row[af])}

  _LOCAL_BUILDER = OmniopdLocalMath
  return _LOCAL_BUILDER


def prepare_local_tfds(jsonl_paths: dict[str, str], data_dir: str, fields=("question", "answer")):
  """Write local JSONL files ({split: path}) as the array_record TFDS dataset LOCAL_TFDS_NAME.

  Read it with source="tfds", tfds_name=LOCAL_TFDS_NAME, tfds_data_dir=data_dir. Returns the
  dataset directory.
  """
  tfds = _tfds()
  builder = _local_builder_class()(
    jsonl_paths=jsonl_paths, fields=tuple(fields), data_dir=data_dir, file_format="array_record"
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_dir)


def prepare_gsm8k(jsonl_dir: str, data_dir: str, splits=("train", "test")) -> str:
  """Prepare TFDS `gsm8k` (array_record) from local copies of openai/grade-school-math's
  `{split}.jsonl` files, with no download. Returns the dataset directory."""
  tfds = _tfds()
  from tensorflow_datasets.text.gsm8k import gsm8k

  paths = {split: os.path.join(jsonl_dir, f"{split}.jsonl") for split in splits}
  for path in paths.values():
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: prepare_gsm8k needs each split's jsonl in {jsonl_dir}")

  with tfds.core.registered.skip_registration():

    class LocalGsm8k(gsm8k.Gsm8k):
      name = "gsm8k"  # same name, features and version: tfds.builder("gsm8k") reads it back

      def _split_generators(self, dl_manager):
        return {split: self._generate_examples(path) for split, path in paths.items()}

  builder = LocalGsm8k(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_dir)


# ----------------------------------------------------------------------------- prompts


def render_prompt(tokenizer, question: str, data_cfg) -> tuple[list[int], str]:
  """(token ids, text) of the prompt for `question`, through the tokenizer's chat template.

  The user turn is the question, then `data_cfg.instruction` on a new line; `system_prompt`
  becomes a system turn. Without a chat template: "User: ...\\nAssistant:" plain text.
  """
  content = question if not data_cfg.instruction else f"{question}\n{data_cfg.instruction}"
  if getattr(tokenizer, "chat_template", None):
    messages = [{"role": "user", "content": content}]
    if data_cfg.system_prompt:
      messages.insert(0, {"role": "system", "content": data_cfg.system_prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already wrote any BOS token into the text.
    return list(tokenizer.encode(text, add_special_tokens=False)), text
  text = f"User: {content}\nAssistant:"
  if data_cfg.system_prompt:
    text = f"{data_cfg.system_prompt}\n\n{text}"
  return list(tokenizer.encode(text, add_special_tokens=True)), text


# ----------------------------------------------------------------------------- iterator


class PromptIterator:
  """Iterator of prompt batches whose position is saved with get_state() / set_state()."""

  def __init__(self, dataset, identity: dict):
    self._dataset = dataset
    self._iterator = iter(dataset)
    self._identity = identity  # what must match for a saved position to mean the same batches

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def get_state(self) -> dict:
    """JSON-serialisable position: the next batch index plus the settings that define batches."""
    return {"grain": self._iterator.get_state(), **self._identity}

  def set_state(self, state: dict) -> None:
    diff = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
    if diff:
      raise ValueError(
        f"iterator state was saved with different data settings (saved, now): {diff}; resume "
        "with the same data config, batch size, seed and process layout"
      )
    self._iterator.set_state(state["grain"])


def make_prompt_iterator(
  data_cfg,
  tokenizer,
  *,
  batch_size: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> PromptIterator:
  """Batches of this process's training prompts, shuffled per epoch, `batch_size` per process.

  Each batch: {"prompt_ids": list[list[int]], "prompt_text": list[str], "examples": list[dict]}.
  Every process sees a disjoint, equal-sized share of each epoch (the remainder of an epoch that
  does not divide by process_count is dropped), so all processes make the same number of steps.
  """
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  rows, convert = _source(data_cfg, "train")
  per_process = len(rows) // process_count
  if per_process < batch_size:
    raise ValueError(
      f"{len(rows)} training problems give {per_process} per process, fewer than batch_size="
      f"{batch_size}: add data or lower the batch size"
    )
  ds = grain.MapDataset.source(rows)
  if data_cfg.shuffle:
    ds = ds.shuffle(seed=seed)  # reseeded each epoch by repeat(), identically on every process
  ds = ds[process_index : per_process * process_count : process_count]
  ds = ds.repeat(data_cfg.num_epochs or None)

  def render(row):
    example = convert(row)
    ids, text = render_prompt(tokenizer, example["question"], data_cfg)
    return {"prompt_ids": ids, "prompt_text": text, "example": example}

  def collate(items):
    return {
      "prompt_ids": [item["prompt_ids"] for item in items],
      "prompt_text": [item["prompt_text"] for item in items],
      "examples": [item["example"] for item in items],
    }

  ds = ds.map(render).batch(batch_size, drop_remainder=True, batch_fn=collate)
  read = grain.ReadOptions(
    num_threads=1 if data_cfg.prefetch else 0, prefetch_buffer_size=data_cfg.prefetch
  )
  identity = {
    "batch_size": batch_size,
    "seed": seed,
    "process_index": process_index,
    "process_count": process_count,
    "num_problems": len(rows),
  }
  return PromptIterator(ds.to_iter_dataset(read), identity)
