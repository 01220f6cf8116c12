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
