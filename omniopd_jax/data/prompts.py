"""Prompt data: the data config, chat-template rendering, and a per-process, shuffled,
checkpointable grain iterator of prompt batches. Sources (reasoning-gym, JSONL/Parquet, TFDS) live
in sources.py and tfds_source.py, row checks in rows.py; their public names are importable here.

  it = data.make_prompt_iterator(config.data, tokenizer, batch_size=8, seed=0, max_prompt_len=256)
  batch = next(it)  # {"prompt_ids": [[...]] * 8, "prompt_text": [...], "examples": [...],
                    #  "num_truncated": 0}  (prompts cut to their last 256 tokens)
  state = it.get_state()  # JSON; it.set_state(state) resumes with identical batches
  it.num_skipped_rows  # bad rows left out (data.skip_bad_rows=True); else a bad row is an error
"""

import logging

import grain
import ml_collections

from omniopd_jax.data import sources
from omniopd_jax.data.sources import SOURCES, SPLITS, Example, load_examples, source
from omniopd_jax.data.tfds_source import LOCAL_TFDS_NAME, prepare_gsm8k, prepare_local_tfds

__all__ = [
  "LOCAL_TFDS_NAME",
  "SOURCES",
  "SPLITS",
  "Example",
  "PromptIterator",
  "default_config",
  "load_examples",
  "make_prompt_iterator",
  "prepare_gsm8k",
  "prepare_local_tfds",
  "render_prompt",
]

logger = logging.getLogger(__name__)


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
  c.eval_seed = -1  # first generator seed of the held-out problems (-1: seed + size)
  # ... which also skip the eval_exclude_size problems from generator seed eval_exclude_seed
  # (problems an earlier stage trained on, e.g. the demo pair's SFT; 0: none)
  c.eval_exclude_seed = 0
  c.eval_exclude_size = 0
  # local files (jsonl / parquet)
  c.train_path = ""  # JSONL or Parquet file of training problems
  c.eval_path = ""  # held-out file; "" holds out the last eval_size rows of train_path
  c.question_field = "question"  # field holding the problem text
  c.answer_field = (
    ""  # field holding the gold answer ("" = "short_answer" for gsm8k, else "answer")
  )
  c.extract_gold = False  # take the final answer out of the gold field ('#### N' solutions)
  c.task_name = "math"  # task of file/TFDS examples (graded with math-verify)
  # row checks (every source): a non-empty question and answer, each at most max_chars long
  c.skip_bad_rows = False  # False: a bad row is an error naming it; True: skipped and counted
  c.max_chars = 20_000  # longest question or answer in characters (0: no limit)
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
  """Iterator of prompt batches whose position is saved with get_state() / set_state().

  `num_skipped_rows`: bad training rows left out (data.skip_bad_rows). `num_truncated_total`:
  prompts cut to max_prompt_len so far (each batch also carries its own "num_truncated").
  """

  def __init__(self, dataset, identity: dict, *, max_prompt_len: int = 0, num_skipped_rows=0):
    self._dataset = dataset
    self._iterator = iter(dataset)
    self._identity = identity  # what must match for a saved position to mean the same batches
    self.max_prompt_len = max_prompt_len
    self.num_skipped_rows = num_skipped_rows
    self.num_truncated_total = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._iterator)
    if batch["num_truncated"] and not self.num_truncated_total:  # warn once, on the first cut
      logger.warning(
        "%d of %d prompts in this batch are longer than max_prompt_len=%d tokens and lose their "
        "beginning (left-truncated); raise max_prompt_len or shorten the prompts. Counted per "
        "step as data/truncated_prompts; this warning is not repeated.",
        batch["num_truncated"], len(batch["prompt_ids"]), self.max_prompt_len,
      )  # fmt: skip
    self.num_truncated_total += batch["num_truncated"]
    return batch

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
  max_prompt_len: int = 0,
) -> PromptIterator:
  """Batches of this process's training prompts, shuffled per epoch, `batch_size` per process.

  Each batch: {"prompt_ids": list[list[int]], "prompt_text": list[str], "examples": list[dict],
  "num_truncated": int}. With max_prompt_len > 0, prompt_ids longer than that keep their last
  max_prompt_len tokens (the end holds the instruction and the generation prompt), and
  "num_truncated" counts them (prompt_text stays whole); the first cut is warned about once.
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
  if max_prompt_len < 0:
    raise ValueError(f"max_prompt_len={max_prompt_len} must be >= 0 (0: no truncation)")
  rows, convert = source(data_cfg, "train")
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
    truncated = bool(max_prompt_len) and len(ids) > max_prompt_len
    if truncated:
      ids = ids[-max_prompt_len:]
    return {"prompt_ids": ids, "prompt_text": text, "example": example, "truncated": truncated}

  def collate(items):
    return {
      "prompt_ids": [item["prompt_ids"] for item in items],
      "prompt_text": [item["prompt_text"] for item in items],
      "examples": [item["example"] for item in items],
      "num_truncated": sum(item["truncated"] for item in items),
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
  return PromptIterator(
    ds.to_iter_dataset(read),
    identity,
    max_prompt_len=max_prompt_len,
    num_skipped_rows=sources.num_skipped(rows),
  )


def left_truncate(prompts, max_len: int) -> tuple[list[list[int]], int]:
  """Prompts cut to their last `max_len` tokens, and how many were cut."""
  cut = sum(len(p) > max_len for p in prompts)
  return [list(p)[-max_len:] for p in prompts], cut
