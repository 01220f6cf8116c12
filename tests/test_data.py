"""Tests for data: sources (reasoning-gym, JSONL, Parquet, TFDS from local files only), prompt
rendering, per-process sharding and the checkpointable iterator."""

import json

import pytest

from omniopd_jax.data import prompts as data
from omniopd_jax.data import sources, tasks


@pytest.fixture(autouse=True)
def no_tfds_download(monkeypatch):
  """Fail loudly, at once, if anything reaches a TFDS download (a real one blocks ~200 s)."""
  from tensorflow_datasets.core.download import download_manager

  def refuse(*args, **kwargs):
    raise AssertionError("a TFDS download was attempted")

  for name in ("download", "download_and_extract", "download_kaggle_data", "extract"):
    monkeypatch.setattr(download_manager.DownloadManager, name, refuse)


@pytest.fixture(scope="module")
def tok():
  return tasks.make_char_tokenizer()


def _rg_config(**overrides):
  cfg = data.default_config()
  cfg.task_kwargs = {
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}
  }
  cfg.size = 40
  cfg.eval_size = 10
  cfg.instruction = ""
  cfg.prefetch = 0
  cfg.update(overrides)
  return cfg


def _write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _problems(n, offset=0):
  return [
    {"problem": f"What is {i} + {i}?", "solution": str(2 * i)} for i in range(offset, offset + n)
  ]


# ----------------------------------------------------------------------------- sources


def test_reasoning_gym_examples_and_held_out_split():
  cfg = _rg_config()
  train = data.load_examples(cfg, "train")
  held_out = data.load_examples(cfg, "eval")
  assert len(train) == 40 and len(held_out) == 10
  for example in train + held_out:
    assert set(example) == {"question", "answer", "task", "metadata"}
    assert example["task"] == "chain_sum" and isinstance(example["answer"], str)
    assert 2 <= example["metadata"]["num_terms"] <= 3  # task_kwargs reached the generator
    json.dumps(example)  # metadata is JSON-serialisable (reasoning-gym puts tuples there)
  assert not {e["question"] for e in train} & {e["question"] for e in held_out}
  assert data.load_examples(cfg, "train") == train  # deterministic


def test_held_out_stream_can_start_elsewhere_and_skip_other_problems():
  questions = lambda examples: {e["question"] for e in examples}  # noqa: E731
  default = data.load_examples(_rg_config(), "eval")
  moved = data.load_examples(_rg_config(eval_seed=5000), "eval")
  assert len(moved) == 10 and moved != default
  assert not questions(moved) & questions(data.load_examples(_rg_config(), "train"))
  # eval_exclude_*: the problems of generator seeds 5000-5019, which the moved split starts with
  skipped = {item["question"] for item in sources._reasoning_gym_dataset(_rg_config(), 20, 5000)}
  assert questions(moved) <= skipped
  cfg = _rg_config(eval_seed=5000, eval_exclude_seed=5000, eval_exclude_size=20)
  kept = data.load_examples(cfg, "eval")
  assert len(kept) == 10 and not questions(kept) & skipped
  one_digit_pairs = {"chain_sum": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)}
  cfg.update(eval_size=300, task_kwargs=one_digit_pairs)  # more than there are such problems
  with pytest.raises(ValueError, match="eval_exclude_size=20"):
    data.load_examples(cfg, "eval")


def test_reasoning_gym_composite():
  cfg = _rg_config(tasks="chain_sum, products", task_weights="1,1", size=60)
  cfg.task_kwargs = {"products": {"min_digits": 1, "max_digits": 1}}
  examples = data.load_examples(cfg, "train")
  assert {e["task"] for e in examples} == {"chain_sum", "products"}
  with pytest.raises(ValueError, match="2 tasks"):
    data.load_examples(_rg_config(tasks="chain_sum,products", task_weights="1"), "train")
  with pytest.raises(ValueError, match="not reasoning-gym tasks"):
    data.load_examples(_rg_config(tasks="chain_summ"), "train")
  bad = _rg_config()
  bad.task_kwargs = {"chain_sum": {"max_term": 4}}
  with pytest.raises(ValueError, match=r"data.task_kwargs.chain_sum is not valid.*max_term"):
    data.load_examples(bad, "train")


def test_jsonl_and_parquet_sources(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = _problems(12)
  jsonl = _write_jsonl(tmp_path / "train.jsonl", rows)
  parquet = str(tmp_path / "train.parquet")
  pq.write_table(pa.Table.from_pylist(rows), parquet)
  for source, path in (("jsonl", jsonl), ("parquet", parquet)):
    cfg = data.default_config()
    cfg.update(source=source, train_path=path, question_field="problem", answer_field="solution")
    cfg.eval_size = 2  # no eval_path: the last 2 rows are held out
    train, held_out = data.load_examples(cfg, "train"), data.load_examples(cfg, "eval")
    assert [e["question"] for e in train] == [r["problem"] for r in rows[:10]]
    assert [e["answer"] for e in held_out] == ["20", "22"]
    assert train[0]["task"] == "math" and "train" in train[0]["metadata"]["source"]
  cfg.eval_path = _write_jsonl(tmp_path / "eval.jsonl", _problems(3, offset=100))
  cfg.source = "jsonl"
  cfg.train_path = jsonl
  assert len(data.load_examples(cfg, "train")) == 12
  assert data.load_examples(cfg, "eval")[0]["answer"] == "200"


def test_extract_gold_for_solution_fields(tmp_path):
  path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "3 + 4 = 7\n#### 7"}] * 3)
  cfg = data.default_config()
  cfg.update(source="jsonl", train_path=path, eval_size=1, extract_gold=True)
  assert data.load_examples(cfg, "eval")[0]["answer"] == "7"


@pytest.mark.parametrize(
  "lines, match",
  [
    (['{"question": "a", "answer": "1"}', "{not json"], r"bad\.jsonl line 2: not valid JSON"),
    (['{"question": "a", "answer": "1"}', "[1, 2]"], r"bad\.jsonl line 2: expected a JSON object"),
    (['{"question": "a", "answer": "1"}', '{"question": "b"}'], r"line 2: missing field 'answer'"),
    (['{"question": "a", "answer": null}'], r"line 1: null/empty answer: field 'answer' is null"),
    ([], r"bad\.jsonl: the file holds no problems"),
  ],
)
def test_malformed_jsonl_is_a_clear_error(tmp_path, lines, match):
  cfg = data.default_config()
  cfg.update(source="jsonl", train_path=_write_jsonl(tmp_path / "bad.jsonl", lines), eval_size=0)
  with pytest.raises(ValueError, match=match):
    data.load_examples(cfg, "train")


# A row per way of being bad, each with the problem the error must name.
BAD_ROWS = [
  ({"question": None, "answer": "1"}, "null/empty question: field 'question' is null"),
  ({"question": "", "answer": "1"}, "null/empty question: field 'question' is ''"),
  ({"question": " \n\t", "answer": "1"}, "null/empty question"),
  ({"question": "q", "answer": "  "}, "null/empty answer"),
  ({"question": {"text": "q"}, "answer": "1"}, "question .field 'question'. is dict"),
  ({"question": ["q"], "answer": "1"}, "question .field 'question'. is list"),
  ({"question": "q", "answer": {"value": 1}}, "answer .field 'answer'. is dict"),
  ({"question": "q", "answer": [1]}, "answer .field 'answer'. is list"),
  ({"question": 7, "answer": "1"}, "question .field 'question'. is int 7, not a string"),
  ({"question": "q", "answer": True}, "answer .field 'answer'. is bool"),
  (
    {"question": "x" * 101, "answer": "1"},
    "question .* has 101 characters, more than data.max_chars=100",
  ),
  ({"answer": "1"}, "missing field 'question' .has \\['answer'\\]"),
]


@pytest.mark.parametrize("row, problem", BAD_ROWS)
def test_bad_rows_are_errors_naming_file_and_line(tmp_path, row, problem):
  good = {"question": "What is 2 + 2?", "answer": "4"}
  path = _write_jsonl(tmp_path / "rows.jsonl", [good, good, row, good])
  cfg = data.default_config()
  cfg.update(source="jsonl", train_path=path, eval_size=0, max_chars=100)
  with pytest.raises(ValueError, match=rf"rows\.jsonl line 3: {problem}.*data\.skip_bad_rows"):
    data.load_examples(cfg, "train")


def test_numeric_answers_are_text_and_limits_can_be_lifted(tmp_path):
  path = _write_jsonl(tmp_path / "n.jsonl", [{"question": "q" * 500, "answer": 42}])
  cfg = data.default_config()
  cfg.update(source="jsonl", train_path=path, eval_size=0, max_chars=0)
  assert data.load_examples(cfg, "train")[0]["answer"] == "42"
  cfg.max_chars = 499
  with pytest.raises(ValueError, match="500 characters"):
    data.load_examples(cfg, "train")


def test_skip_bad_rows_counts_and_warns_once(tmp_path, tok, caplog):
  good = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)]
  bad = [row for row, _ in BAD_ROWS]
  path = _write_jsonl(tmp_path / "mixed.jsonl", bad + good)
  cfg = data.default_config()
  cfg.update(source="jsonl", train_path=path, eval_size=2, max_chars=100, skip_bad_rows=True)
  with caplog.at_level("WARNING"):
    train = data.load_examples(cfg, "train")
  assert [e["question"] for e in train] == [g["question"] for g in good[:4]]
  warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert len(warnings) == 1 and f"skipped {len(bad)} bad rows of {len(bad) + 6}" in warnings[0]
  assert "mixed.jsonl line 1: null/empty question" in warnings[0]
  it = data.make_prompt_iterator(cfg, tok, batch_size=2, seed=0, process_index=0, process_count=1)
  assert it.num_skipped_rows == len(bad) and it.get_state()["num_problems"] == 4
  _write_jsonl(tmp_path / "mixed.jsonl", bad)
  with pytest.raises(ValueError, match=r"no usable problems \(12 bad rows; the first: .*line 1"):
    data.load_examples(cfg, "train")


def test_generated_rows_are_checked_by_row_index():
  cfg = _rg_config(max_chars=12)  # every chain_sum question is longer than 12 characters
  with pytest.raises(ValueError, match=r"reasoning-gym chain_sum \(seed 0\) row 0: question"):
    data.load_examples(cfg, "train")
  cfg.skip_bad_rows = True
  with pytest.raises(ValueError, match=r"no usable problems \(40 bad rows"):
    data.load_examples(cfg, "train")


def test_unreadable_files_are_clear_errors(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  cfg = data.default_config()
  cfg.update(source="parquet", eval_size=0, train_path=str(tmp_path / "missing.parquet"))
  with pytest.raises(FileNotFoundError, match=r"missing\.parquet: no such data file"):
    data.load_examples(cfg, "train")
  (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
  cfg.train_path = str(tmp_path / "junk.parquet")
  with pytest.raises(ValueError, match=r"junk\.parquet: not a readable Parquet file"):
    data.load_examples(cfg, "train")
  cfg.train_path = str(tmp_path / "rows.parquet")
  pq.write_table(
    pa.Table.from_pylist([{"question": "a", "answer": "1"}, {"question": "b"}]), cfg.train_path
  )
  # Parquet stores a row without the column as null.
  with pytest.raises(ValueError, match=r"rows\.parquet row 1: null/empty answer"):
    data.load_examples(cfg, "train")
  (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "1"}\n')
  cfg.update(source="jsonl", train_path=str(tmp_path / "latin1.jsonl"))
  with pytest.raises(ValueError, match=r"latin1\.jsonl: not a readable UTF-8"):
    data.load_examples(cfg, "train")
  with pytest.raises(ValueError, match="data.source"):
    data.load_examples(_rg_config(source="csv"), "train")


def test_local_array_record_tfds_builder(tmp_path):
  import tensorflow_datasets as tfds

  train = _write_jsonl(tmp_path / "train.jsonl", _problems(8))
  test = _write_jsonl(tmp_path / "test.jsonl", _problems(4, offset=50))
  data_dir = str(tmp_path / "tfds")
  data.prepare_local_tfds({"train": train, "test": test}, data_dir, fields=("problem", "solution"))
  source = tfds.data_source(data.LOCAL_TFDS_NAME, split="test", data_dir=data_dir, download=False)
  assert len(source) == 4 and isinstance(source[0]["question"], bytes)  # TFDS text is bytes
  cfg = data.default_config()
  cfg.update(source="tfds", tfds_name=data.LOCAL_TFDS_NAME, tfds_data_dir=data_dir, eval_size=0)
  train_examples = data.load_examples(cfg, "train")
  assert sorted(e["question"] for e in train_examples) == sorted(r["problem"] for r in _problems(8))
  assert {e["answer"] for e in data.load_examples(cfg, "eval")} == {"100", "102", "104", "106"}
  cfg.tfds_split = "train[:50%]"
  assert len(data.load_examples(cfg, "train")) == 4
  cfg.question_field = "prompt"
  with pytest.raises(ValueError, match="no feature 'prompt'"):
    data.load_examples(cfg, "train")
  bad = _write_jsonl(tmp_path / "bad.jsonl", [*_problems(2), {"problem": None, "solution": "1"}])
  with pytest.raises(ValueError, match=r"bad\.jsonl line 3: null/empty question"):
    data.prepare_local_tfds({"train": bad}, str(tmp_path / "bad_tfds"), ("problem", "solution"))


def test_gsm8k_reads_prepared_files_and_explains_when_absent(tmp_path):
  cfg = data.default_config()
  cfg.update(source="tfds", tfds_name="gsm8k", tfds_data_dir=str(tmp_path / "tfds"), eval_size=0)
  with pytest.raises(
    FileNotFoundError, match=r"(?s)not prepared under .*gsm8k.*download_and_prepare.*prepare_gsm8k"
  ):
    data.load_examples(cfg, "train")
  # Prepare the real gsm8k builder's files from local copies of the openai jsonl files.
  raw = tmp_path / "raw"
  raw.mkdir()
  for split, offset in (("train", 0), ("test", 10)):
    rows = [
      {
        "question": f"Tom has {i} apples and buys {i}. How many?",
        "answer": f"{i}+{i}=<<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}",
      }
      for i in range(offset, offset + 5)
    ]
    _write_jsonl(raw / f"{split}.jsonl", rows)
  data.prepare_gsm8k(str(raw), cfg.tfds_data_dir)
  test = data.load_examples(cfg, "eval")  # tfds_eval_split = "test"
  assert len(test) == 5
  assert {e["answer"] for e in test} == {"20", "22", "24", "26", "28"}  # short_answer by default
  assert all(e["question"].startswith("Tom has ") and e["task"] == "math" for e in test)


# ----------------------------------------------------------------------------- prompts


def test_render_prompt_through_chat_template(tok):
  cfg = data.default_config()
  cfg.update(system_prompt="Be exact.", instruction="Show your steps.")
  ids, text = data.render_prompt(tok, "4 + 3 =", cfg)
  assert text == "<bos>Be exact.\nQ: 4 + 3 =\nShow your steps.\nA: "
  messages = [
    {"role": "system", "content": "Be exact."},
    {"role": "user", "content": "4 + 3 =\nShow your steps."},
  ]
  assert ids == tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
  assert ids.count(tok.bos_token_id) == 1


def test_render_prompt_without_chat_template(tok, tmp_path):
  import transformers

  tok.save_pretrained(tmp_path)
  plain = transformers.AutoTokenizer.from_pretrained(tmp_path)
  plain.chat_template = None
  cfg = data.default_config()
  cfg.instruction = ""
  ids, text = data.render_prompt(plain, "4 + 3 =", cfg)
  assert text == "User: 4 + 3 =\nAssistant:"
  assert plain.decode(ids) == text


# ----------------------------------------------------------------------------- iterator


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batches_shards_and_epochs(tok):
  cfg = _rg_config(size=21, num_epochs=2)
  all_questions = {e["question"] for e in data.load_examples(cfg, "train")}
  shards = []
  for p in range(3):
    it = data.make_prompt_iterator(cfg, tok, batch_size=7, seed=1, process_index=p, process_count=3)
    batches = list(it)  # 2 epochs x 7 problems per process = 2 batches, then StopIteration
    assert len(batches) == 2
    for batch in batches:
      assert len(batch["prompt_ids"]) == len(batch["prompt_text"]) == len(batch["examples"]) == 7
      for ids, text, example in zip(batch["prompt_ids"], batch["prompt_text"], batch["examples"]):
        assert ids == data.render_prompt(tok, example["question"], cfg)[0]
        assert tok.decode(ids) == text
    shards.append([[e["question"] for e in b["examples"]] for b in batches])
  for epoch in range(2):
    questions = [q for shard in shards for q in shard[epoch]]
    assert len(questions) == 21 and set(questions) == all_questions  # disjoint, complete
  assert shards[0][0] != shards[0][1]  # reshuffled each epoch
  unshuffled = data.make_prompt_iterator(
    _rg_config(size=21, shuffle=False), tok, batch_size=7, seed=1, process_index=0, process_count=1
  )
  assert [e["question"] for e in next(unshuffled)["examples"]] == [
    e["question"] for e in data.load_examples(cfg, "train")[:7]
  ]


def test_resume_gives_identical_batches(tok):
  cfg = _rg_config(size=30, prefetch=2)
  kwargs = dict(batch_size=4, seed=3, process_index=1, process_count=2)
  it = data.make_prompt_iterator(cfg, tok, **kwargs)
  _take(it, 5)  # past the first epoch boundary (15 problems per process)
  state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip
  expected = _take(it, 6)
  resumed = data.make_prompt_iterator(cfg, tok, **kwargs)
  resumed.set_state(state)
  assert _take(resumed, 6) == expected
  fresh = data.make_prompt_iterator(cfg, tok, **kwargs)
  assert _take(fresh, 6) != expected
  other = data.make_prompt_iterator(cfg, tok, **{**kwargs, "seed": 4})
  with pytest.raises(ValueError, match="different data settings.*seed"):
    other.set_state(state)


def test_iterator_argument_errors_and_jax_default(tok):
  cfg = _rg_config(size=10)
  with pytest.raises(ValueError, match="fewer than batch_size"):
    data.make_prompt_iterator(cfg, tok, batch_size=8, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_index=2"):
    data.make_prompt_iterator(cfg, tok, batch_size=1, seed=0, process_index=2, process_count=2)
  it = data.make_prompt_iterator(cfg, tok, batch_size=2, seed=0)  # one JAX process here
  assert it.get_state()["process_count"] == 1


def test_truncated_prompts_are_counted_and_warned_about_once(tok, caplog):
  cfg = _rg_config(size=12, shuffle=False)
  full = [data.render_prompt(tok, e["question"], cfg)[0] for e in data.load_examples(cfg, "train")]
  limit = sorted(len(ids) for ids in full)[len(full) // 2]  # about half the prompts are longer
  kwargs = dict(batch_size=4, seed=0, process_index=0, process_count=1)
  it = data.make_prompt_iterator(cfg, tok, max_prompt_len=limit, **kwargs)
  with caplog.at_level("WARNING"):
    batches = _take(it, 3)
  for b, batch in enumerate(batches):
    expected = full[4 * b : 4 * b + 4]
    assert batch["prompt_ids"] == [ids[-limit:] for ids in expected]  # the end is kept
    assert batch["num_truncated"] == sum(len(ids) > limit for ids in expected)
  assert it.num_truncated_total == sum(len(ids) > limit for ids in full) > 0
  warnings = [r.getMessage() for r in caplog.records if "max_prompt_len" in r.getMessage()]
  assert len(warnings) == 1 and f"max_prompt_len={limit}" in warnings[0]
  untouched = data.make_prompt_iterator(cfg, tok, **kwargs)  # max_prompt_len=0: no cut
  assert next(untouched)["prompt_ids"] == full[:4] and untouched.num_truncated_total == 0
