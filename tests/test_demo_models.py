"""demo_models: compact demo prompts, the cached smoke/demo model pair, the in-project SFT (the
documented build command at CI size) and the shipped teacher/student pair's held-out accuracy."""

import json
import os

import pytest

from omniopd_jax.configs import math as math_config
from omniopd_jax.data import prompts as data
from omniopd_jax.experiments import demo_models
from omniopd_jax.models import hf


def demo_config(**demo):
  config = math_config.get_config("demo")
  config.unlock()
  config.data.eval_size = config.eval.num_examples = 8
  config.demo.update(**demo)
  return config


def test_demo_prompts_drop_the_boilerplate():
  tok = demo_models.make_tokenizer()
  question = demo_models.BOILERPLATE + "12 + 7 - 30 ="
  ids, text = data.render_prompt(tok, question, demo_config().data)
  assert text == "<bos>Q: 12 + 7 - 30 =\nA: "
  assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("Q: 12 + 7 - 30 =\nA: ")


def test_smoke_models_are_built_once(tmp_path):
  config = math_config.get_config("smoke")
  student, teacher = demo_models.build(str(tmp_path), config, log=print)
  for path in (student, teacher):
    assert hf.read_hf_config(path)["vocab_size"] == len(demo_models.make_tokenizer())
    assert hf.load_tokenizer(path).chat_template == demo_models.make_tokenizer().chat_template
  mtime = os.path.getmtime(os.path.join(student, "model.safetensors"))
  assert demo_models.build(str(tmp_path), config, log=print) == (student, teacher)
  assert os.path.getmtime(os.path.join(student, "model.safetensors")) == mtime


def test_demo_build_trains_and_caches(tmp_path):
  """The build command's path at CI size: the teacher is copied, the student base trained here by
  the selection rule (its SFT loss falls; it stops at the first validation eval at or above the
  bar; the headroom check runs and is printed and recorded), then a second build reuses both."""
  smoke_student, smoke_teacher = demo_models.build(
    str(tmp_path / "smoke"), math_config.get_config("smoke"), log=print
  )
  config = demo_config(teacher_path=smoke_teacher, student_path="", student_steps=60,
                       teacher_examples=64, student_lr=3e-3, student_batch_size=16,
                       student_eval_every=20, student_eval_examples=8, student_stop_accuracy=0.0,
                       headroom_steps=2)  # fmt: skip
  config.batch_size = 8
  logs = []
  student, teacher = demo_models.build(str(tmp_path / "demo"), config, log=logs.append)
  assert any("teacher copied from" in m for m in logs)
  assert any("training the student base" in m for m in logs)
  assert any("student rule: constant lr 0.003" in m for m in logs), logs
  losses = [float(m.split("loss ")[1].split()[0]) for m in logs if "sft step" in m]
  assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5, losses
  # a bar of 0.0 is met at the first eval: training stops there, not at student_steps
  assert [m for m in logs if "validation accuracy" in m][0].startswith("demo: student step 20 ")
  assert not any("sft step 60/60" in m for m in logs)
  assert any("headroom check: 2 more SFT steps x 8" in m for m in logs), logs
  with open(os.path.join(student, demo_models.SELECTION_FILE)) as f:
    record = json.load(f)
  assert record["stopped_at"] == 20 and len(record["validation_curve"]) == 1
  assert record["rule"]["student_stop_accuracy"] == 0.0
  assert 0.0 <= record["held_out_before"] <= 1.0 and isinstance(record["headroom_pass"], bool)
  assert hf.read_hf_config(teacher)["num_hidden_layers"] == demo_models.TEACHER["num_hidden_layers"]
  assert hf.read_hf_config(student)["num_hidden_layers"] == demo_models.STUDENT["num_hidden_layers"]
  logs.clear()
  assert demo_models.build(str(tmp_path / "demo"), config, log=logs.append) == (student, teacher)
  assert not logs


def test_validation_problems_stay_out_of_the_held_out_split():
  config = demo_config()
  config.data.eval_size = 64
  held_out = {ex["question"] for ex in data.load_examples(config.data, "eval")}
  valid = demo_models.validation_examples(config.data, 32, seed=202)
  assert len(valid) == 32 and not held_out & {ex["question"] for ex in valid}


def test_demo_split_is_held_out_from_every_training_stage():
  """The demo's (and compare's) 2048 held-out problems: no RL training problem, no problem the
  pair's SFT could draw (every candidate, not only those it kept: short sums recur across seeds),
  none of the first 256-problem split, which the pair's SFT skips and its build records read."""
  config = math_config.get_config("demo")
  questions = lambda cfg, split: {e["question"] for e in data.load_examples(cfg, split)}  # noqa: E731
  demo = questions(config.data, "eval")
  first_cfg = config.data.copy_and_resolve_references()
  first_cfg.update(**math_config.FIRST_EVAL)
  first = questions(first_cfg, "eval")
  assert len(demo) == 2048 and len(first) == 256
  # demo_models._pairs: sft_examples draws 2 * teacher_examples candidates from seed + 101
  sft_cfg = config.data.copy_and_resolve_references()
  sft_cfg.update(seed=config.seed + 101, size=2 * config.demo.teacher_examples)
  assert (config.data.eval_exclude_seed, config.data.eval_exclude_size) == (
    sft_cfg.seed, sft_cfg.size)  # fmt: skip
  sft = questions(sft_cfg, "train")
  assert not demo & (questions(config.data, "train") | sft | first)
  assert first & sft  # candidates, skipped by the SFT as held out (demo_models._pairs)
  assert demo_models.held_out_questions(config.data) == demo | first
  build_cfg, n = demo_models.build_eval(config)
  assert n == 256 and {e["question"] for e in data.load_examples(build_cfg, "eval")} == first


def test_missing_source_is_a_clear_error(tmp_path):
  config = demo_config(teacher_path=str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="not an HF model directory"):
    demo_models.build(str(tmp_path), config, log=print)


def test_bundled_pair_strong_teacher_weaker_student():
  examples = 64
  config = demo_config()
  config.data.eval_size = examples
  accuracy = {}
  for name in ("teacher", "student"):
    model, tok = hf.load_pretrained(os.path.join(demo_models.BUNDLED, f"demo_{name}"))
    accuracy[name] = demo_models.greedy_accuracy(model, tok, config.data, examples, 64)
  assert accuracy["teacher"] >= 0.8, accuracy
  assert 0.1 <= accuracy["student"] <= 0.6, accuracy
  # the shipped student was chosen by the rule, which stopped it early and recorded its checks
  with open(os.path.join(demo_models.BUNDLED, "demo_student", demo_models.SELECTION_FILE)) as f:
    record = json.load(f)
  curve = record["validation_curve"]
  assert record["stopped_at"] == curve[-1][0] < record["rule"]["student_steps"], record
  assert curve[-1][1] >= record["rule"]["student_stop_accuracy"] > max(a for _, a in curve[:-1])
  assert record["held_out_after_sft"] > record["held_out_before"], record


# ----------------------------------------------------------------------------- style shift

CHAIN = {"task": "chain_sum", "answer": "18", "metadata": {"expression": "7 + 4 - 2 + 9"}}
NESTED = {"task": "basic_arithmetic", "answer": "-14", "metadata": {"expression": "-(3 + 4) * 2"}}


def test_shifted_style_same_steps_other_separators():
  from omniopd_jax.data import tasks

  assert tasks.worked_solution(CHAIN) == "7 + 4 = 11\n11 - 2 = 9\n9 + 9 = 18\nAnswer: 18"
  assert tasks.worked_solution(CHAIN, "shifted") == "7+4=11; 11-2=9; 9+9=18\nAnswer: 18"
  assert tasks.worked_solution(NESTED, "shifted") == "3+4=7; -(7)=-7; -7*2=-14\nAnswer: -14"
  for example in (CHAIN, NESTED):
    student = tasks.solution_segments(example, "student")
    shifted = tasks.solution_segments(example, "shifted")
    assert "".join(t for t, _ in student) == tasks.worked_solution(example)
    assert [k for _, k in student] == [k for _, k in shifted]
    for (a, kind), (b, _) in zip(student, shifted):
      # numbers agree; separators differ at their first character, except the graded answer line
      assert a == b if kind == "num" or a in ("-(", ")", tasks.ANSWER_SEP) else a[0] != b[0], (a, b)
  with pytest.raises(ValueError, match="choose from"):
    tasks.worked_solution(CHAIN, "fancy")


def test_style_shift_pairs_continue_a_student_prefix_in_the_shifted_style():
  import numpy as np

  from omniopd_jax.data import grading, tasks

  rng = np.random.RandomState(0)
  shifted = tasks.worked_solution(CHAIN, "shifted")
  seen = set()
  for _ in range(3000):
    prefix, rest = tasks.style_shift_pair(CHAIN, rng)
    assert grading.extract_answer(prefix + rest) == "18", (prefix, rest)
    if not prefix:
      assert rest == shifted
      seen.add("own")
    elif prefix == "7 + 4 = 11\n":  # student lines, cut between segments: shifted from here on
      assert rest == "11-2=9; 9+9=18\nAnswer: 18"
      seen.add("line")
    elif prefix == "7 + 4 = 1":  # cut inside a number: finish it, then the shifted style
      assert rest == "1; 11-2=9; 9+9=18\nAnswer: 18"
      seen.add("digit")
    elif prefix == "7 ":  # cut inside a student separator: finish it as begun
      assert rest == "+ 4=11; 11-2=9; 9+9=18\nAnswer: 18"
      seen.add("sep")
  assert seen == {"own", "line", "digit", "sep"}, seen
  tok = demo_models.make_tokenizer()
  pairs = tasks.sft_examples(
    demo_config().data, tok, 4, seed=1, style="shifted", cuts_per_problem=3
  )
  assert len(pairs) == 12 and all(r[-1] == tok.eos_token_id for _, r in pairs)


def test_gold_logprobs_match_a_per_example_forward(tmp_path):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from omniopd_jax.data import tasks

  _, teacher = demo_models.build(str(tmp_path), math_config.get_config("smoke"), log=print)
  model, tok = hf.load_pretrained(teacher)
  config = demo_config()
  examples = data.load_examples(config.data, "eval")[:3]
  got = demo_models.gold_logprobs(model, tok, config.data, examples, "shifted")
  want = []
  for ex in examples:  # one unpadded sequence at a time
    prompt, _ = data.render_prompt(tok, ex["question"], config.data)
    response = [*tok.encode(tasks.worked_solution(ex, "shifted")), tok.eos_token_id]
    logp = jax.nn.log_softmax(model(jnp.asarray([[*prompt, *response]]))[0], -1)
    want += [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(response)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_shifted_teacher_build_records_its_style_figures(tmp_path):
  """The style-shift teacher's build path at CI size: fine-tuned from a given teacher on
  shifted-style continuations, its figures printed and written beside it; bundled is refused."""
  smoke_student, smoke_teacher = demo_models.build(
    str(tmp_path / "smoke"), math_config.get_config("smoke"), log=print
  )
  with pytest.raises(ValueError, match="teacher_style='shifted'"):
    demo_models.build(str(tmp_path / "x"), demo_config(teacher_style="shifted"), log=print)
  config = demo_config(teacher_style="shifted", teacher_path="", teacher_init=smoke_teacher,
                       student_path=smoke_student, teacher_steps=6, teacher_examples=16)  # fmt: skip
  logs = []
  _, teacher = demo_models.build(str(tmp_path / "demo"), config, log=logs.append)
  assert any("shifted style" in m for m in logs) and any(
    "training the teacher from" in m for m in logs
  )
  assert any("shifted teacher: accuracy" in m for m in logs), logs
  with open(os.path.join(teacher, demo_models.STYLE_FILE)) as f:
    figures = json.load(f)
  assert figures["style"] == "shifted" and figures["examples"] == 8
  for key in ("accuracy", "own_format_exact", "student_gold_below_0.1", "shifted_gold_below_0.1"):
    assert 0.0 <= figures[key] <= 1.0, key
  assert figures["student_gold_logprob"] < 0 and figures["shifted_gold_logprob"] < 0
