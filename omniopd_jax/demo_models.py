"""The self-contained student and teacher of the `:smoke` and `:demo` configs, built once and cached
as HF directories under <workdir>/models (so the run itself loads them like any checkpoint).

`:smoke` uses tiny random models. `:demo` trains, in-project, a teacher that is strong on worked
chain-sum solutions and a weaker student base (fewer layers, fewer steps), both character-level.
"""

import os
import time

import jax
import numpy as np
from flax import nnx

from omniopd_jax import hf, sharding, tasks, train_step
from omniopd_jax import model as model_lib

STUDENT = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)  # fmt: skip
TEACHER = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2)  # fmt: skip


def model_config(tokenizer, architecture="llama", **sizes) -> model_lib.ModelConfig:
  return model_lib.ModelConfig(
    vocab_size=len(tokenizer), architecture=architecture, max_position_embeddings=512,
    qk_norm=architecture == "qwen3", tie_word_embeddings=True, **sizes,
  )  # fmt: skip


def save(model, tokenizer, path: str) -> str:
  tmp = path + ".tmp"
  hf.save_pretrained(model, tokenizer, tmp)
  with open(os.path.join(tmp, "generation_config.json"), "w") as f:
    f.write(
      f'{{"eos_token_id": {tokenizer.eos_token_id}, "pad_token_id": {tokenizer.pad_token_id}}}'
    )
  os.replace(tmp, path)
  return path


def sft_train(model, tokenizer, pairs, *, steps, batch_size, learning_rate, seed=0, log=print):
  """Supervised training of `model` on (prompt ids, response ids) pairs with our own train step."""
  from configs import math as math_config

  config = math_config.get_config("smoke")
  config.unlock()
  config.method = "sft"
  config.num_steps = steps
  config.optimizer.update(learning_rate=learning_rate, warmup_steps=max(steps // 20, 1),
                          min_lr_ratio=0.05, b2=0.98)  # fmt: skip
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=jax.devices()[:1])
  graphdef, params = nnx.split(model)
  tx = train_step.make_optimizer(config.optimizer, steps)
  state = train_step.init_state(params, tx, seed)
  update = train_step.make_update_fn(config, mesh, graphdef, jax.eval_shape(lambda: state))
  prompt_len = max(len(p) for p, _ in pairs)
  length = max(len(r) for _, r in pairs)
  rng = np.random.RandomState(seed)
  start = time.time()
  for step in range(steps):
    idx = rng.randint(0, len(pairs), size=batch_size)
    tokens = np.zeros((batch_size, prompt_len + length), np.int32)
    mask = np.zeros_like(tokens, bool)
    for row, i in enumerate(idx):
      p, r = pairs[i]
      tokens[row, prompt_len - len(p) : prompt_len] = p
      tokens[row, prompt_len : prompt_len + len(r)] = r
      mask[row, prompt_len - len(p) : prompt_len + len(r)] = True
    batch = {
      "tokens": tokens,
      "attention_mask": mask,
      "response_tokens": tokens[:, prompt_len:],
      "response_mask": mask[:, prompt_len:],
    }
    state, metrics = update(state, None, batch)
    if step % max(steps // 10, 1) == 0 or step == steps - 1:
      log(f"  sft step {step + 1}/{steps} loss {float(metrics['train/loss']):.4f} "
          f"({time.time() - start:.0f}s)")  # fmt: skip
  nnx.update(model, state.params)
  return model


def build(workdir: str, config, log=print) -> tuple[str, str]:
  """(student_dir, teacher_dir) for the smoke/demo variants, built once and cached."""
  root = os.path.join(workdir, "models")
  student_dir, teacher_dir = os.path.join(root, "student"), os.path.join(root, "teacher")
  if os.path.exists(os.path.join(student_dir, "config.json")) and os.path.exists(
    os.path.join(teacher_dir, "config.json")
  ):
    return student_dir, teacher_dir
  os.makedirs(root, exist_ok=True)
  tokenizer = tasks.make_char_tokenizer()
  demo = "demo" in config.variant.split(",")
  student = model_lib.CausalLM(model_config(tokenizer, **STUDENT), rngs=nnx.Rngs(config.seed))
  teacher = model_lib.CausalLM(
    model_config(tokenizer, "qwen3", **TEACHER), rngs=nnx.Rngs(config.seed + 1)
  )
  if demo:
    d = config.demo
    log(f"demo: training the teacher on {d.teacher_examples} worked solutions (once, cached)")
    pairs = tasks.sft_examples(config.data, tokenizer, d.teacher_examples, seed=config.seed + 101)
    sft_train(teacher, tokenizer, pairs, steps=d.teacher_steps, batch_size=d.sft_batch_size,
              learning_rate=d.teacher_lr, seed=config.seed, log=log)  # fmt: skip
    log(f"demo: training the student base ({d.student_steps} steps)")
    sft_train(student, tokenizer, pairs, steps=d.student_steps, batch_size=d.sft_batch_size,
              learning_rate=d.student_lr, seed=config.seed + 1, log=log)  # fmt: skip
  save(teacher, tokenizer, teacher_dir)
  save(student, tokenizer, student_dir)
  return student_dir, teacher_dir
