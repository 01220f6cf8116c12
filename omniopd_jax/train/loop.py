"""The training loop: prompts -> rollouts -> forks -> teacher (async) -> similarity -> posterior ->
update -> metrics, checkpoints, evaluation. `run(config, workdir)` is the whole program.

On-policy by default: step t's rollouts come from the parameters after update t-1. Within a step
the host overlaps scoring of finished teacher requests with requests still in flight.
`one_step_off=True` instead samples step t+1 and submits its teacher requests before waiting for
step t's teacher, so the teacher of t+1 runs during update t (the step-t+1 samples are one update
stale) and two steps of teacher requests overlap.
"""

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from omniopd_jax import sharding
from omniopd_jax.data import prompts as data
from omniopd_jax.eval import evaluate
from omniopd_jax.methods import collect
from omniopd_jax.models import hf
from omniopd_jax.reward import similarity as scoring
from omniopd_jax.rollout import sampler
from omniopd_jax.teacher import client as tc
from omniopd_jax.train import checkpoint, metrics
from omniopd_jax.train import step as train_step

log = logging.getLogger("omniopd_jax")

SECRET_MARKERS = ("key", "token", "secret", "password")


def resolved_config_json(config) -> str:
  """The config as JSON with anything that looks like a secret value blanked."""

  def scrub(node):
    if isinstance(node, dict):
      return {
        k: ("<redacted>" if any(m in k.lower() for m in SECRET_MARKERS) and isinstance(v, str)
            and v and not k.endswith("_env") and k not in ("max_tokens",) else scrub(v))
        for k, v in node.items()
      }  # fmt: skip
    if isinstance(node, (list, tuple)):
      return [scrub(v) for v in node]
    return node

  return json.dumps(scrub(config.to_dict()), indent=2, sort_keys=True, default=str)


def teacher_client_config(teacher_cfg, *, chunk_len: int, workdir: str, base_url: str) -> dict:
  """Our config section -> TeacherClient.from_config fields (0 / "" mean "none")."""
  t = teacher_cfg.to_dict()
  none_if = lambda v: v or None  # noqa: E731
  return {
    "backend": t["backend"],
    "base_url": base_url or None,
    "model": t["model"],
    "api_key_env": none_if(t["api_key_env"]),
    "max_in_flight": t["max_in_flight"],
    "rpm": none_if(t["rpm"]),
    "input_tpm": none_if(t["input_tpm"]),
    "output_tpm": none_if(t["output_tpm"]),
    "max_retries": t["max_retries"],
    "timeout_s": t["timeout_s"],
    "cache_dir": t["cache_dir"] or os.path.join(workdir, "teacher_cache"),
    "price_in_per_mtok": t["price_in_per_mtok"],
    "price_out_per_mtok": t["price_out_per_mtok"],
    "budget_usd": none_if(t["budget_usd"]),
    "allow_approximate": t["allow_approximate"],
    "temperature": t["temperature"],
    "max_tokens": t["max_tokens"] or chunk_len,
    "prompts_per_request": none_if(t["prompts_per_request"]),
  }


@dataclasses.dataclass
class Context:
  """What the per-method collectors need (host side)."""

  config: Any
  tokenizer: Any
  eos_ids: tuple[int, ...]
  rules: tuple
  rollout_mesh: Any
  process_index: int
  teacher: Any = None
  scorer: Any = None
  backend: str = ""
  teacher_logprobs_fn: Any = None


def eos_ids_of(tokenizer, path: str) -> tuple[int, ...]:
  ids = set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  gen = os.path.join(path, "generation_config.json")
  if os.path.exists(gen):
    with open(gen) as f:
      value = json.load(f).get("eos_token_id")
    ids.update([value] if isinstance(value, int) else (value or []))
  return tuple(sorted(ids))


def resolve_models(config, workdir: str) -> tuple[str, str]:
  """(student dir, teacher dir or "") with a clear error when a path is missing."""
  variants = config.variant.split(",")
  if "smoke" in variants or "demo" in variants:
    from omniopd_jax.experiments import demo_models

    # Process 0 builds (once, cached in the workdir); the others wait, then read the cache.
    if jax.process_index() == 0:
      demo_models.build(workdir, config, log=lambda m: print(m, flush=True))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("omniopd_jax.experiments.demo_models")
    student, teacher = demo_models.build(workdir, config, log=lambda m: print(m, flush=True))
    return config.model.student_path or student, teacher
  path = config.model.student_path
  if not path:
    raise ValueError(
      "config.model.student_path is empty: pass --config.model.student_path=/path/to/hf_dir (an HF "
      "directory with config.json, safetensors and tokenizer files; `python -m "
      "omniopd_jax.tools.import_gguf --out DIR` makes one from the bundled SmolLM2), or use the "
      ":smoke / :demo variants, which build their own models"
    )
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(
      f"config.model.student_path={path!r} has no config.json: it must be an HF model directory"
    )
  return path, config.opd.teacher_path


def start_teacher(config, teacher_dir: str, workdir: str):
  """The teacher URL; for smoke/demo without a base_url, our own server in a subprocess."""
  if config.teacher.base_url or not config.smoke_serve_teacher:
    return config.teacher.base_url, None
  from omniopd_jax.teacher import server as serve

  handle = serve.start_subprocess(teacher_dir, log_path=os.path.join(workdir, "teacher_server.log"))
  print(f"teacher: serving {teacher_dir} at {handle.url}", flush=True)
  return handle.url, handle


def make_teacher_logprobs_fn(teacher_model, config):
  """Teacher log-probs of the student's sampled tokens (white-box OPD, same tokenizer)."""
  graphdef, params = nnx.split(teacher_model)

  @jax.jit
  def fn(params, tokens, mask, targets):
    logits = train_step.response_logits(
      graphdef, params, {"tokens": tokens, "attention_mask": mask, "response_mask": targets}
    )
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

  return lambda b: fn(params, b["tokens"], b["attention_mask"], b["response_tokens"])


def check_same_tokenizer(student_tok, teacher_tok):
  if teacher_tok is None or student_tok.get_vocab() != teacher_tok.get_vocab():
    raise ValueError(
      "method=opd (white-box OPD) needs a teacher with the student's tokenizer, token for token; "
      "this teacher's vocabulary differs. Use method=omniopd, which needs only the teacher's text."
    )


def run(config, workdir: str) -> dict:
  """Train `config` in `workdir` (auto-resuming); returns the final metrics."""
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)
  mesh = sharding.make_mesh(config.mesh)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(resolved_config_json(config))
  student_dir, teacher_dir = resolve_models(config, workdir)
  tokenizer = hf.load_tokenizer(config.model.tokenizer_path or student_dir)
  if tokenizer is None:
    raise FileNotFoundError(f"no tokenizer files in {student_dir}: set config.model.tokenizer_path")
  with jax.set_mesh(mesh):
    model = hf.load_model(student_dir, config.model.dtype, config.model.param_dtype, mesh, rules)
  graphdef, params = nnx.split(model)
  # A real copy (astype to the same dtype would alias): the state's buffers are donated.
  base_dtype = hf.DTYPES[config.model.base_dtype]
  base_params = jax.tree.map(lambda x: jnp.array(x, dtype=base_dtype, copy=True), params)
  tx = train_step.make_optimizer(config.optimizer, config.num_steps)
  state = train_step.init_state(params, tx, config.seed)
  abstract = jax.eval_shape(lambda: state)
  update = train_step.make_update_fn(config, mesh, graphdef, abstract, rules)
  state = jax.device_put(state, update.shardings)

  ckpt = checkpoint.Checkpointer(
    workdir, every=config.checkpoint_every, keep=config.keep_checkpoints
  )
  per_process = config.batch_size // jax.process_count()
  prompts_per_step = per_process // (config.grpo.group_size if config.method == "grpo" else 1)
  data_iter = data.make_prompt_iterator(
    config.data, tokenizer, batch_size=prompts_per_step, seed=config.seed
  )
  eos_ids = eos_ids_of(tokenizer, student_dir)
  ctx = Context(config, tokenizer, eos_ids, rules, mesh, jax.process_index())

  server = None
  teacher_params = None
  if config.method == "omniopd":
    url, server = start_teacher(config, teacher_dir, workdir)
    ctx.backend = config.teacher.backend
    client_cfg = teacher_client_config(
      config.teacher, chunk_len=config.omniopd.chunk_len, workdir=workdir, base_url=url
    )
    ctx.teacher = tc.TeacherClient.from_config(client_cfg)
    info = ctx.teacher.probe()
    print(
      f"teacher: {info['backend']} mode={info['mode']} approximate={info['approximate']}",
      flush=True,
    )
    ctx.scorer = scoring.make_scorer(config.scoring)
  elif config.method == "opd":
    teacher_path = config.opd.teacher_path or teacher_dir
    if not teacher_path:
      raise ValueError("method=opd needs config.opd.teacher_path (an HF dir, same tokenizer)")
    with jax.set_mesh(mesh):
      teacher_model, teacher_tok = hf.load_pretrained(
        teacher_path, config.model.dtype, mesh=mesh, rules=rules
      )
    check_same_tokenizer(tokenizer, teacher_tok)
    ctx.teacher_logprobs_fn = make_teacher_logprobs_fn(teacher_model, config)
    if config.opd.estimator == "full_vocab":
      teacher_graphdef, teacher_params = nnx.split(teacher_model)
      # The teacher's own architecture (it may differ from the student's); shardings unchanged.
      update = train_step.make_update_fn(
        config, mesh, graphdef, abstract, rules, teacher_graphdef=teacher_graphdef
      )

  start_step = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)  # the live state carries the target shardings
    # Processes step in lockstep, so process 0's saved position is every process's position.
    data_iter.set_state({**meta["data"], "process_index": jax.process_index()})
    if ctx.teacher is not None and meta.get("teacher"):
      ctx.teacher.load_state_dict(meta["teacher"])
    start_step = int(state.step)
    print(f"resumed from step {start_step} ({ckpt.directory})", flush=True)

  writer = metrics.MetricsWriter(
    workdir, num_steps=config.num_steps, start_step=start_step, enabled=is_main
  )
  eval_examples = data.load_examples(config.data, "eval")[: config.eval.num_examples]
  # Each process evaluates its share; the metrics are averaged over processes, weighted by size.
  usable = len(eval_examples) - len(eval_examples) % jax.process_count()  # equal shares
  eval_examples = eval_examples[:usable][jax.process_index() :: jax.process_count()]

  def run_eval(step):
    model_now = nnx.merge(graphdef, state.params)
    gen = evaluate_generate_fn(model_now, ctx)
    res = evaluate.evaluate(
      gen, tokenizer, eval_examples, num_samples=config.eval.num_samples,
      temperature=config.eval.temperature,
      max_new_tokens=config.eval.max_new_tokens or config.rollout.max_new_tokens,
      batch_size=config.eval.batch_size, data_cfg=config.data, seed=config.seed,
    )  # fmt: skip
    scalars = {k: float(v) for k, v in res.items() if isinstance(v, (int, float))}
    if jax.process_count() > 1:
      n = float(len(eval_examples))
      keys = sorted(scalars)
      local = np.array([n] + [scalars[k] * n for k in keys], np.float64)
      total = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(local)).sum(0)
      scalars = {k: float(total[i + 1] / max(total[0], 1.0)) for i, k in enumerate(keys)}
      scalars["eval/num_examples"] = float(total[0])
    writer.write(step, scalars)
    if is_main:
      with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")
    return scalars

  stop = {"signal": None}

  def on_signal(signum, frame):
    stop["signal"] = signum

  def finish_step(step, got, device_metrics, data_state, t0, t_step) -> bool:
    """Everything after update `step`: NaN guard, metrics, checkpoint, eval. True = stop."""
    jax.block_until_ready(device_metrics["train/loss"])
    host = dict(got.metrics)
    host.update({f"time/{k}_s": v for k, v in got.timings.items()})
    host["time/update_s"] = time.perf_counter() - t0
    host["time/step_s"] = time.perf_counter() - t_step
    if ctx.teacher is not None:
      host.update(ctx.teacher.metrics(reset=True))
    meta = _meta(data_state, ctx)
    if not bool(device_metrics["train/loss_finite"]):
      # The update left the state untouched, so `state` is the last good one.
      good = int(state.step)
      ckpt.maybe_save(good, state, meta, force=True)
      ckpt.wait()
      raise FloatingPointError(
        f"non-finite loss or gradient at step {step}: stopped; the last good state (step {good}) "
        f"is saved in {ckpt.directory}. Lower the learning rate or check the data."
      )
    writer.push(step, device_metrics, host)
    if step % config.log_every == 0 or step == config.num_steps:
      writer.flush()
      writer.write_texts(step, got.texts)
      writer.progress(step)
    ckpt.maybe_save(step, state, meta)
    if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
      print(f"eval at step {step}: {fmt(run_eval(step))}", flush=True)
    if ctx.teacher is not None and ctx.teacher.budget_exhausted:
      print(f"teacher budget reached ({ctx.teacher.halted}): stopping at step {step}", flush=True)
      ckpt.maybe_save(step, state, meta, force=True)
      return True
    if stop["signal"] is not None:
      print(f"signal {stop['signal']}: checkpointing step {step} and stopping", flush=True)
      ckpt.maybe_save(step, state, meta, force=True)
      return True
    return False

  previous = signal.signal(signal.SIGTERM, on_signal)
  collector = collect.COLLECTORS[config.method]
  final: dict = {}
  try:
    if start_step == 0 and eval_examples:
      before = run_eval(0)
      print(f"eval before training: {fmt(before)}", flush=True)
      final["eval_before"] = before
    if config.one_step_off and start_step < config.num_steps:
      print(
        "one_step_off: the teacher for step t+1 overlaps update t (samples one update stale)",
        flush=True,
      )
    pending, previous_step = None, None
    stopped = False
    for step in range(start_step + 1, config.num_steps + 1):
      t_step = time.perf_counter()
      model_now = nnx.merge(graphdef, state.params)
      if pending is None:
        pending = collector(ctx, model_now, next(data_iter), step)
      data_state = data_iter.get_state()
      following = None
      if config.one_step_off and step < config.num_steps:
        # Sample step t+1 now (device; the parameters after update t-1) and submit its teacher
        # requests before waiting for step t's: the teacher works on two steps at once, and the
        # requests of t+1 are in flight through this wait, update t and the next rollout.
        following = collector(ctx, model_now, next(data_iter), step + 1)
      got = pending()  # host: teacher wait + scoring
      if previous_step is not None and finish_step(*previous_step):
        stopped = True
        break
      pending = following
      t0 = time.perf_counter()
      state, device_metrics = update(state, base_params, got.batch, teacher_params)
      previous_step = (step, got, device_metrics, data_state, t0, t_step)
      if pending is None:  # on-policy: finish now
        previous_step = None
        if finish_step(step, got, device_metrics, data_state, t0, t_step):
          stopped = True
          break
    if previous_step is not None and not stopped:
      stopped = finish_step(*previous_step)
    if not stopped:
      ckpt.maybe_save(config.num_steps, state, _meta(data_iter.get_state(), ctx), force=True)
      if eval_examples:
        after = run_eval(config.num_steps)
        print(f"eval after training: {fmt(after)}", flush=True)
        final["eval_after"] = after
    writer.flush()
    final.update(writer.last)
    return final
  finally:
    signal.signal(signal.SIGTERM, previous)
    ckpt.close()
    writer.close()
    if ctx.teacher is not None:
      ctx.teacher.close()
    if server is not None:
      server.stop()


def _meta(data_state, ctx) -> dict:
  meta = {"data": data_state}
  if ctx.teacher is not None:
    meta["teacher"] = ctx.teacher.state_dict()
  return meta


def fmt(scalars: dict) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))


def evaluate_generate_fn(model, ctx):
  def gen(prompt_ids_list, max_new_tokens, temperature, seed):
    prompts, _ = collect.left_truncate(prompt_ids_list, ctx.config.max_prompt_len)
    roll = sampler.generate(
      model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
      eos_ids=ctx.eos_ids, mesh=ctx.rollout_mesh, rules=ctx.rules,
      prompt_len=ctx.config.max_prompt_len,
    )  # fmt: skip
    return [t[m].tolist() for t, m in zip(roll.tokens, roll.mask)]

  return gen


def setup_logging():
  logging.basicConfig(
    stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
  )
  np.set_printoptions(precision=4, suppress=True)
