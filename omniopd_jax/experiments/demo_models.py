"""The self-contained student and teacher of the `:smoke` and `:demo` configs, built once and cached
as HF directories under <workdir>/models (so the run itself loads them like any checkpoint).

`:smoke` uses tiny random models. `:demo` trains, in-project, a character-level teacher that is
strong on worked chain-sum solutions and a student base with room to learn (`select_student`: half
the layers, stopped right after its accuracy jump, with a printed headroom check):

  python -m omniopd_jax.experiments.demo_models --out=/tmp/demo_models             # both
  python -m omniopd_jax.experiments.demo_models --out=DIR --teacher=bundled        # the shipped pair
  python -m omniopd_jax.experiments.demo_models --out=DIR --teacher_steps=30 --student_steps=10 \
      --set=headroom_steps=2                                                          # CI size
  python -m omniopd_jax.experiments.demo_models --out=DIR --teacher_style=shifted --student=bundled

The last one is compare's style-shift teacher: the same task's solutions in another surface form
("4+13=17; 17-5=12" for the student's "4 + 13 = 17\n17 - 5 = 12"), continuing a student-style
prefix in its own style (data/tasks.py `style_shift_pair`), made by the STYLE_SHIFT recipe (the
bundled teacher fine-tuned 300 steps). Its own-format accuracy and the log-probability it gives the
student's gold tokens go to STYLE_FILE in its directory.
"""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omniopd_jax import sharding
from omniopd_jax.data import prompts as data
from omniopd_jax.data import tasks
from omniopd_jax.eval import evaluate
from omniopd_jax.methods import base as methods_base
from omniopd_jax.methods import sft
from omniopd_jax.models import hf
from omniopd_jax.models import lm as model_lib
from omniopd_jax.train import step as train_step

STUDENT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)  # fmt: skip
TEACHER = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2)  # fmt: skip

# The shipped pair (fp32 safetensors, ~4 MB together), made on one GPU by this module's own
# command (see the docstring); `config.demo.teacher_path` / `student_path` = "bundled" copies them.
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SELECTION_FILE = "demo_selection.json"  # the student rule's curve and headroom check, in its dir
STYLE_FILE = "teacher_style.json"  # a teacher's style figures (`style_figures`), in its dir
# The style-shift teacher's recipe (config.demo overrides): the bundled teacher, which already
# does the arithmetic, fine-tuned into the shifted form in 300 steps (~15 min on 2 busy cores;
# its loss is ~0.2 by step 120). From scratch it would take the teacher's ~6000 (hours there).
STYLE_SHIFT = dict(teacher_style="shifted", teacher_init="bundled", teacher_steps=300,
                   teacher_lr=1e-3)  # fmt: skip

# reasoning-gym's chain_sum questions open with this sentence; the demo's chat template drops it,
# so a prompt reads "Q: 7 + 4 - 2 =\nA: " (a third of the tokens: every step is cheaper).
BOILERPLATE = "State the final answer to the following arithmetic problem: "


def make_tokenizer():
  """tasks.make_char_tokenizer() with a chat template that drops reasoning-gym's boilerplate."""
  tokenizer = tasks.make_char_tokenizer()
  user = "Q: {{ message['content'] }}"
  if user not in tokenizer.chat_template:
    raise RuntimeError("tasks.CHAT_TEMPLATE changed: update demo_models.make_tokenizer")
  tokenizer.chat_template = tokenizer.chat_template.replace(
    user, f"Q: {{{{ message['content'] | replace('{BOILERPLATE}', '') }}}}"
  )
  return tokenizer


def model_config(tokenizer, architecture="llama", **sizes) -> model_lib.ModelConfig:
  return model_lib.ModelConfig(
    vocab_size=len(tokenizer), architecture=architecture, max_position_embeddings=512,
    qk_norm=architecture == "qwen3", tie_word_embeddings=True, **sizes,
  )  # fmt: skip


def save(model, tokenizer, path: str) -> str:
  """Writes an HF directory atomically (a crash never leaves a half-written `path`)."""
  tmp = path + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  hf.save_pretrained(model, tokenizer, tmp)
  with open(os.path.join(tmp, "generation_config.json"), "w") as f:
    f.write(
      f'{{"eos_token_id": {tokenizer.eos_token_id}, "pad_token_id": {tokenizer.pad_token_id}}}'
    )
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)
  return path


def sft_train(
  model,
  tokenizer,
  pairs,
  *,
  steps,
  batch_size,
  learning_rate,
  seed=0,
  log=print,
  min_lr_ratio=0.05,
  on_step=None,
):
  """Supervised training of `model` on (prompt ids, response ids) pairs with our own train step.

  AdamW, 5% warmup then cosine decay to `min_lr_ratio` x `learning_rate` (1.0: constant; the
  teacher decays, which cleans up its arithmetic; the student base does not, see `select_student`).
  Batches are sampled with replacement from `pairs`. `on_step(step, model)`, when given, runs after
  every step with the model's current parameters and stops training early by returning True.
  """
  from omniopd_jax.configs import math as math_config

  config = math_config.get_config("smoke")
  config.unlock()
  config.method = "sft"
  config.num_steps = steps
  config.optimizer.update(learning_rate=learning_rate, warmup_steps=max(steps // 20, 1),
                          min_lr_ratio=min_lr_ratio, b2=0.98)  # fmt: skip
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=jax.devices()[:1])
  graphdef, params = nnx.split(model)
  params = jax.tree.map(jnp.copy, params)  # the update donates its state: keep `model`'s arrays
  tx = train_step.make_optimizer(config.optimizer, steps)
  state = train_step.init_state(params, tx, seed)
  update = train_step.make_update_fn(config, mesh, graphdef, jax.eval_shape(lambda: state))
  state = jax.device_put(state, update.shardings)  # as the update returns it: one compile
  prompt_len = max(len(p) for p, _ in pairs)
  length = max(len(r) for _, r in pairs)
  rng = np.random.RandomState(seed)
  start = time.time()
  for step in range(steps):
    idx = rng.randint(0, len(pairs), size=batch_size)
    responses = np.zeros((batch_size, length), np.int32)  # [B, L]
    response_mask = np.zeros((batch_size, length), bool)  # [B, L]
    for row, i in enumerate(idx):
      r = pairs[i][1]
      responses[row, : len(r)], response_mask[row, : len(r)] = r, True
    seq = methods_base.pack([pairs[i][0] for i in idx], responses, response_mask, prompt_len)
    state, metrics = update(state, None, sft.SFTBatch(seq=seq))
    if step % max(steps // 10, 1) == 0 or step == steps - 1:
      log(f"  sft step {step + 1}/{steps} loss {float(metrics['train/loss']):.4f} "
          f"({time.time() - start:.0f}s)")  # fmt: skip
    if on_step is not None:
      nnx.update(model, state.params)
      if on_step(step + 1, model):
        break
  nnx.update(model, state.params)
  return model


def greedy_accuracy(
  model, tokenizer, data_cfg, num_examples: int, max_new_tokens: int, examples=None
) -> float:
  """Greedy pass@1 on `examples`, by default the first `num_examples` held-out problems."""
  if examples is None:
    examples = data.load_examples(data_cfg, "eval")[:num_examples]
  res = evaluate.evaluate(
    evaluate.sampler_generate_fn(model, tokenizer), tokenizer, examples,
    max_new_tokens=max_new_tokens, batch_size=64, data_cfg=data_cfg,
  )  # fmt: skip
  return float(res["eval/pass@1"])


def held_out_questions(data_cfg) -> set[str]:
  """Every held-out problem a model built here is measured on: `data_cfg`'s eval split and, on
  its task, configs/math.py's DEMO_EVAL and FIRST_EVAL splits. The pair's SFT and validation
  problems avoid all of them."""
  from omniopd_jax.configs import math as math_config

  questions, seen = set(), set()
  for split in ({}, math_config.DEMO_EVAL, math_config.FIRST_EVAL):
    cfg = data_cfg.copy_and_resolve_references()
    cfg.update(**split)
    key = tuple(cfg[k] for k in math_config.DEMO_EVAL)
    if key not in seen:  # data_cfg is often one of the two: generate each split once
      seen.add(key)
      questions.update(example["question"] for example in data.load_examples(cfg, "eval"))
  return questions


def build_eval(config) -> tuple:
  """(data config, problems) of the build's own evaluations (teacher accuracy, headroom check,
  style figures): the first config.eval.num_examples of configs/math.py's FIRST_EVAL split, at
  most its 256, so the records (the shipped ones too) read the same whatever split a run uses."""
  from omniopd_jax.configs import math as math_config

  cfg = config.data.copy_and_resolve_references()
  cfg.update(**math_config.FIRST_EVAL)
  cfg.eval_size = min(cfg.eval_size, config.data.eval_size or cfg.eval_size)
  return cfg, min(config.eval.num_examples or cfg.eval_size, cfg.eval_size)


def validation_examples(data_cfg, n: int, seed: int) -> list[dict]:
  """n problems of `data_cfg`'s task from generator `seed`, none held out (`held_out_questions`):
  the student's stopping rule reads these, so the held-out accuracy the demo reports stays unseen."""
  held_out = held_out_questions(data_cfg)
  cfg = data_cfg.copy_and_resolve_references()
  cfg.seed, cfg.size = seed, 2 * n
  kept = [ex for ex in data.load_examples(cfg, "train") if ex["question"] not in held_out]
  if len(kept) < n:
    raise ValueError(f"only {len(kept)} validation problems outside the held-out split")
  return kept[:n]


def _train_teacher(config, tokenizer, pairs, *, seed, log):
  d = config.demo
  if d.teacher_init:  # fine-tune a trained teacher (the style shift: it already does arithmetic)
    path = os.path.join(BUNDLED, "demo_teacher") if d.teacher_init == "bundled" else d.teacher_init
    model = hf.load_model(path)
    log(f"demo: training the teacher from {path} (up to {d.teacher_steps} steps)")
  else:
    model = _new_model("teacher", TEACHER, "qwen3", tokenizer, d.teacher_steps, seed, log)
  t0 = time.time()
  sft_train(model, tokenizer, pairs, steps=d.teacher_steps, batch_size=d.sft_batch_size,
            learning_rate=d.teacher_lr, seed=seed, log=log)  # fmt: skip
  data_cfg, n = build_eval(config)
  acc = greedy_accuracy(model, tokenizer, data_cfg, n, config.rollout.max_new_tokens)
  log(f"demo: teacher held-out greedy accuracy {acc:.3f} on {n} problems "
      f"({time.time() - t0:.0f}s)")  # fmt: skip
  return model


def style_figures(model, tokenizer, config, style: str) -> dict:
  """How a teacher of `style` writes and scores the demo's held-out problems: greedy accuracy
  (the grader's), the share of greedy solutions that are exactly the gold one in `style` (its own
  format), and the mean log-probability per token it gives each style's gold solution (+ EOS),
  with the share of tokens it gives under 10%: the student's tokens are what OPD's teacher scores."""
  data_cfg, n = build_eval(config)
  examples = data.load_examples(data_cfg, "eval")[:n]
  out_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"style_eval_{os.getpid()}.json")
  res = evaluate.evaluate(
    evaluate.sampler_generate_fn(model, tokenizer), tokenizer, examples,
    max_new_tokens=config.rollout.max_new_tokens, batch_size=64, data_cfg=config.data,
    out_path=out_path,
  )  # fmt: skip
  with open(out_path) as f:
    records = json.load(f)["examples"]
  os.remove(out_path)
  own = [
    r["greedy_response"] == tasks.worked_solution(ex, style) for r, ex in zip(records, examples)
  ]
  figures = dict(style=style, examples=len(examples), accuracy=float(res["eval/pass@1"]),
                 own_format_exact=float(np.mean(own)))  # fmt: skip
  for gold_style in tasks.STYLES:
    logp = gold_logprobs(model, tokenizer, config.data, examples, gold_style)
    figures[f"{gold_style}_gold_logprob"] = float(np.mean(logp))
    figures[f"{gold_style}_gold_below_0.1"] = float(np.mean(logp < np.log(0.1)))
  return figures


def gold_logprobs(model, tokenizer, data_cfg, examples, style: str) -> np.ndarray:
  """Log-probabilities [N tokens] that `model` gives each token of the gold worked solutions in
  `style` (and their EOS), teacher-forced after the rendered prompt, over all `examples`."""
  rows = []
  for ex in examples:
    prompt, _ = data.render_prompt(tokenizer, ex["question"], data_cfg)
    response = tokenizer.encode(tasks.worked_solution(ex, style), add_special_tokens=False)
    rows.append((prompt, [*response, tokenizer.eos_token_id]))
  width = max(len(p) + len(r) for p, r in rows)
  ids = np.zeros((len(rows), width), np.int32)  # [B, T], right-padded: causal, so harmless
  for i, (p, r) in enumerate(rows):
    ids[i, : len(p) + len(r)] = [*p, *r]
  logits = np.asarray(model(jnp.asarray(ids)), np.float32)  # [B, T, V]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  out = []
  for i, (p, r) in enumerate(rows):
    positions = np.arange(len(p) - 1, len(p) + len(r) - 1)  # each predicts the next token
    out.append(logp[i, positions, ids[i, positions + 1]])
  return np.concatenate(out)


def _new_model(name, sizes, architecture, tokenizer, steps, seed, log):
  model = model_lib.CausalLM(model_config(tokenizer, architecture, **sizes), rngs=nnx.Rngs(seed))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  log(f"demo: training the {name} ({architecture}, {n / 1e3:.0f}k parameters, "
      f"up to {steps} steps)")  # fmt: skip
  return model


def select_student(config, tokenizer, pairs, *, seed, log):
  """The student base, by a rule chosen so that learning is still visible from it.

  A base trained to convergence with a decayed rate sits on the flat end of its learning curve:
  nothing (not even SFT on gold solutions) moves it much in a demo's budget. So: SFT at a constant
  `student_lr`, a greedy validation eval every `student_eval_every` steps, and stop at the first
  eval at or above `student_stop_accuracy` (right after the jump from ~0 that this task shows).
  Then the headroom check: a copy trained `headroom_steps` more SFT steps at `headroom_lr` (the
  comparison's budget or less (`batch_size` samples a step) must gain at least `headroom_min_gain` of
  held-out accuracy. Returns (model, record) with the curve and both checks for the model dir.
  """
  d = config.demo
  model = _new_model("student base", STUDENT, "llama", tokenizer, d.student_steps, seed, log)
  log(f"demo: student rule: constant lr {d.student_lr:g}, batch {d.student_batch_size}; stop at "
      f"the first validation eval (every {d.student_eval_every} steps) >= "
      f"{d.student_stop_accuracy:.2f}")  # fmt: skip
  valid = validation_examples(config.data, d.student_eval_examples, seed=config.seed + 202)
  max_new = config.rollout.max_new_tokens
  curve, t0 = [], time.time()

  def after_jump(step, m):
    if step % d.student_eval_every:
      return False
    acc = greedy_accuracy(m, tokenizer, config.data, 0, max_new, examples=valid)
    curve.append([step, round(acc, 4)])
    log(f"demo: student step {step} validation accuracy {acc:.3f} ({time.time() - t0:.0f}s)")
    return acc >= d.student_stop_accuracy

  sft_train(model, tokenizer, pairs, steps=d.student_steps, batch_size=d.student_batch_size,
            learning_rate=d.student_lr, seed=seed, log=log, min_lr_ratio=1.0,
            on_step=after_jump)  # fmt: skip
  stopped = curve[-1][0] if curve else d.student_steps
  if not curve or curve[-1][1] < d.student_stop_accuracy:
    log(f"demo: WARNING the student never reached {d.student_stop_accuracy:.2f} in "
        f"{d.student_steps} steps: the base is the last step")  # fmt: skip
  record = dict(rule=dict(d.to_dict()), stopped_at=stopped, validation_curve=curve)
  record.update(headroom(model, config, tokenizer, pairs, seed=seed, log=log))
  return model, record


def headroom(model, config, tokenizer, pairs, *, seed, log) -> dict:
  """Held-out accuracy of the base and of a copy after `headroom_steps` more SFT steps."""
  d, max_new = config.demo, config.rollout.max_new_tokens
  data_cfg, n = build_eval(config)
  before = greedy_accuracy(model, tokenizer, data_cfg, n, max_new)
  trained = nnx.clone(model)
  sft_train(trained, tokenizer, pairs, steps=d.headroom_steps, batch_size=config.batch_size,
            learning_rate=d.headroom_lr, seed=seed + 1, log=lambda m: None,
            min_lr_ratio=1.0)  # fmt: skip
  after = greedy_accuracy(trained, tokenizer, data_cfg, n, max_new)
  ok = after - before >= d.headroom_min_gain
  log(f"demo: student base held-out {before:.3f}; headroom check: {d.headroom_steps} more SFT "
      f"steps x {config.batch_size} at lr {d.headroom_lr:g} -> {after:.3f} "
      f"({after - before:+.3f}, needs >= {d.headroom_min_gain:+.2f}): "
      f"{'PASS' if ok else 'FAIL'}")  # fmt: skip
  return dict(held_out_before=before, held_out_after_sft=after, headroom_pass=bool(ok))


def build(workdir: str, config, log=print) -> tuple[str, str]:
  """(student_dir, teacher_dir) per `config.model.build_demo_models`, built once and cached:
  "tiny" (the :smoke variant) random models, "trained" (:demo) the pair below.

  Demo: `config.demo.teacher_path` / `student_path` name an HF directory to copy ("bundled": the
  pair shipped in omniopd_jax/experiments/assets), or "" to train that model here with `sft_train` (the
  teacher takes ~6000 steps to pass 90%: tens of minutes on 2 CPU cores, seconds on a GPU).
  """
  root = os.path.join(workdir, "models")
  student_dir, teacher_dir = os.path.join(root, "student"), os.path.join(root, "teacher")
  kind = config.model.build_demo_models
  if kind not in ("tiny", "trained"):
    raise ValueError(f"config.model.build_demo_models={kind!r}: choose tiny or trained")
  demo = kind == "trained"
  os.makedirs(root, exist_ok=True)
  tokenizer = make_tokenizer()
  if not demo:
    if not _ready(student_dir) or not _ready(teacher_dir):
      student = model_lib.CausalLM(model_config(tokenizer, **STUDENT), rngs=nnx.Rngs(config.seed))
      teacher = model_lib.CausalLM(
        model_config(tokenizer, "qwen3", **TEACHER), rngs=nnx.Rngs(config.seed + 1)
      )
      save(teacher, tokenizer, teacher_dir)
      save(student, tokenizer, student_dir)
    return student_dir, teacher_dir

  d = config.demo
  if d.teacher_style not in tasks.STYLES:
    raise ValueError(f"config.demo.teacher_style={d.teacher_style!r}: choose from "
                     f"{sorted(tasks.STYLES)}")  # fmt: skip
  if d.teacher_style != "student" and d.teacher_path == "bundled":
    raise ValueError("config.demo.teacher_style='shifted' trains its own teacher: set "
                     "config.demo.teacher_path to '' (or to a shifted teacher's HF dir)")  # fmt: skip
  for name, out, source in (
    ("teacher", teacher_dir, d.teacher_path),
    ("student base", student_dir, d.student_path),
  ):
    if _ready(out):
      continue
    if source:
      _copy(name, source, out, log)
      continue
    if name == "teacher":
      build_teacher(config, tokenizer, out, log=log)
      continue
    pairs = _pairs(config, tokenizer, log)
    model, record = select_student(config, tokenizer, pairs, seed=config.seed, log=log)
    save(model, tokenizer, out)
    with open(os.path.join(out, SELECTION_FILE), "w") as f:
      json.dump(record, f, indent=1)
  return student_dir, teacher_dir


def _copy(name, source, out, log):
  path = os.path.join(BUNDLED, f"demo_{name.split()[0]}") if source == "bundled" else source
  if not _ready(path):
    raise FileNotFoundError(
      f"config.demo: {name} source {source!r} -> {path} is not an HF model directory; set it "
      f"to '' to train the {name} here"
    )
  log(f"demo: {name} copied from {path}")
  shutil.rmtree(out + ".tmp", ignore_errors=True)
  shutil.copytree(path, out + ".tmp")
  os.replace(out + ".tmp", out)


def _ready(path: str) -> bool:
  return os.path.exists(os.path.join(path, "config.json"))


def build_teacher(config, tokenizer, out: str, log=print) -> str:
  """Trains the demo teacher in `config.demo.teacher_style` and saves it to `out`; a shifted
  teacher's `style_figures` go to out/STYLE_FILE (and the log)."""
  style = config.demo.teacher_style
  pairs = _pairs(config, tokenizer, log, style)
  model = _train_teacher(config, tokenizer, pairs, seed=config.seed + 1, log=log)
  save(model, tokenizer, out)
  if style != "student":
    figures = style_figures(model, tokenizer, config, style)
    log(f"demo: {style} teacher: accuracy {figures['accuracy']:.3f}, own format exact "
        f"{figures['own_format_exact']:.3f}; mean log-prob per token of the student's gold "
        f"solutions {figures['student_gold_logprob']:.3f} ({figures['student_gold_below_0.1']:.1%} "
        f"of tokens under 0.1), of its own style's {figures[f'{style}_gold_logprob']:.3f}")  # fmt: skip
    with open(os.path.join(out, STYLE_FILE), "w") as f:
      json.dump(figures, f, indent=1)
  return out


def style_shift_teacher(out: str, config, init: str, *, steps=0, examples=0, log=print) -> str:
  """compare's style-shift teacher at `out`, trained once: the teacher at `init` fine-tuned into
  the shifted surface form by the STYLE_SHIFT recipe (`steps` / `examples` > 0: a smaller run)."""
  if _ready(out):
    return out
  config = config.copy_and_resolve_references()
  config.demo.update(**STYLE_SHIFT)
  config.demo.teacher_init = init
  if steps:
    config.demo.update(teacher_steps=steps, teacher_examples=examples)
  return build_teacher(config, make_tokenizer(), out, log=log)


def _pairs(config, tokenizer, log, style="student"):
  t0 = time.time()
  pairs = tasks.sft_examples(
    config.data, tokenizer, config.demo.teacher_examples, seed=config.seed + 101, style=style,
    held_out=held_out_questions(config.data)
  )  # fmt: skip
  log(f"demo: {len(pairs)} worked solutions, {style} style ({time.time() - t0:.1f}s)")
  return pairs


def main(argv):
  del argv
  import ast

  from absl import flags

  from omniopd_jax.configs import math as math_config

  f = flags.FLAGS
  config = math_config.get_config("demo")
  config.unlock()
  if f.teacher_style == "shifted":  # its recipe, under any flag below
    config.demo.update(**STYLE_SHIFT)
  for name in ("teacher_steps", "student_steps", "teacher_examples"):
    if getattr(f, name):
      config.demo[name] = getattr(f, name)
  for item in f.set:  # FIELD=VALUE of config.demo, a Python literal
    field, sep, text = item.partition("=")
    if not sep or field not in config.demo:
      raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD in {list(config.demo)}")
    config.demo[field] = type(config.demo[field])(ast.literal_eval(text))
  config.demo.teacher_path, config.demo.student_path = f.teacher, f.student
  build(f.out, config)
  print(f"wrote {f.out}/models/teacher and {f.out}/models/student")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("out", None, "Directory; the models go to OUT/models/{teacher,student}.")
  flags.DEFINE_string("teacher", "", "'' trains the teacher too; 'bundled' or an HF dir copies it.")
  flags.DEFINE_string(
    "student", "", "'' trains the student base; 'bundled' or an HF dir copies it."
  )
  flags.DEFINE_enum("teacher_style", "student", ["student", "shifted"], "'shifted': compare's "
                    "style-shift teacher, by demo_models.STYLE_SHIFT's recipe.")  # fmt: skip
  flags.DEFINE_integer("teacher_steps", 0, "Override config.demo.teacher_steps.")
  flags.DEFINE_integer("student_steps", 0, "Override config.demo.student_steps.")
  flags.DEFINE_integer("teacher_examples", 0, "Override config.demo.teacher_examples.")
  flags.DEFINE_multi_string("set", [], "FIELD=VALUE override of config.demo (repeatable), e.g. "
                            "--set=headroom_steps=20.")  # fmt: skip
  flags.mark_flag_as_required("out")
  app.run(main)
