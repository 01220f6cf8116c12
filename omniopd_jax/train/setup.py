"""Everything a run needs before its first step, built once: `setup(config, workdir)` returns the
immutable `Runtime` (models, mesh, data, teacher, scorer, the jitted update, checkpointer, metrics
writer) and the train state to start from (restored from the latest checkpoint, else fresh).

Parts are chosen from explicit config fields, never from the variant's name:
`model.build_demo_models` builds the :smoke / :demo pair, `teacher.serve_local` serves the teacher
model in a subprocess, and the method's `teacher` kind (methods.base.Method) says whether a text
API client and a scorer, or a same-tokenizer model in process, are set up.
"""

import dataclasses
import json
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import multihost_utils

from omniopd_jax import sharding
from omniopd_jax.data import prompts as data
from omniopd_jax.methods import base, losses, opd, registry
from omniopd_jax.models import hf
from omniopd_jax.reward import similarity as scoring
from omniopd_jax.teacher import client as tc
from omniopd_jax.train import checkpoint, metrics
from omniopd_jax.train import step as train_step

SECRET_MARKERS = ("key", "token", "secret", "password")


@dataclasses.dataclass(frozen=True)
class Runtime:
  """What stays fixed for a whole run (the train state is the loop's, not the runtime's)."""

  config: Any
  workdir: str
  method: base.Method
  mesh: Any
  graphdef: Any  # the student's nnx graph definition
  ctx: base.Context  # tokenizer, EOS ids, teacher client, scorer: what collectors need
  base_params: Any  # the frozen KL anchor (an argument of update, never donated)
  teacher_params: Any  # in-process teacher (opd full_vocab) or None
  update: Any  # train.step.make_update_fn
  checkpointer: checkpoint.Checkpointer
  data: Any  # the prompt iterator (its position is checkpointed)
  eval_examples: list  # this process's share of the held-out problems
  writer: metrics.MetricsWriter
  stop_requested: threading.Event  # set by SIGTERM: pending waits give up, the loop stops
  server: Any = None  # teacher.server handle when teacher.serve_local started one

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  def close(self) -> None:
    """Waits for checkpoints on disk, flushes metrics, stops the teacher (and its server)."""
    self.checkpointer.close()
    self.writer.close()
    if self.ctx.teacher is not None:
      self.ctx.teacher.close()
    if self.server is not None:
      self.server.stop()


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
    "halt_after_failed_calls": t["halt_after_failed_calls"],
  }


def resolve_models(config, workdir: str) -> tuple[str, str]:
  """(student dir, teacher dir or "") with a clear error when a path is missing."""
  if config.model.build_demo_models:
    from omniopd_jax.experiments import demo_models

    # Process 0 builds (once, cached in the workdir); the others wait, then read the cache.
    if jax.process_index() == 0:
      demo_models.build(workdir, config, log=lambda m: print(m, flush=True))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("omniopd_jax.experiments.demo_models")
    student, teacher = demo_models.build(workdir, config, log=lambda m: print(m, flush=True))
    return config.model.student_path or student, config.opd.teacher_path or teacher
  path = config.model.student_path
  if not path:
    raise ValueError(
      "config.model.student_path is empty: pass --config.model.student_path=/path/to/hf_dir (an HF "
      "directory with config.json, safetensors and tokenizer files; `python -m "
      "omniopd_jax.tools.import_gguf --out DIR` makes one from the bundled SmolLM2), or use the "
      ":smoke / :demo variants, which build their own models (config.model.build_demo_models)"
    )
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(
      f"config.model.student_path={path!r} has no config.json: it must be an HF model directory"
    )
  return path, config.opd.teacher_path


def start_teacher_server(config, teacher_dir: str, workdir: str):
  """(teacher URL, server handle or None): with teacher.serve_local and no base_url, our own
  server on `teacher_dir` in a subprocess."""
  if config.teacher.base_url or not config.teacher.serve_local:
    return config.teacher.base_url, None
  if not teacher_dir:
    raise ValueError("teacher.serve_local needs a teacher model: set config.opd.teacher_path")
  from omniopd_jax.teacher import server as serve

  handle = serve.start_subprocess(teacher_dir, log_path=os.path.join(workdir, "teacher_server.log"))
  print(f"teacher: serving {teacher_dir} at {handle.url}", flush=True)
  return handle.url, handle


def make_teacher_logprobs_fn(teacher_model):
  """Sequences -> the in-process teacher's log-probs of the response tokens [B, L]."""
  graphdef, params = nnx.split(teacher_model)

  @jax.jit
  def fn(params, seq):
    logits = train_step.response_logits(graphdef, params, seq)  # [B, L, V]
    return losses.token_logprobs(logits, seq.response_tokens)

  return lambda seq: fn(params, seq)


def start_api_teacher(config, teacher_dir: str, workdir: str, saved_state: dict | None = None):
  """(TeacherClient after its probe, scorer, server handle or None) for teacher="api" methods.

  `saved_state` (a checkpoint's teacher counters) is loaded before the probe, so the budget counts
  what earlier runs spent and the probe's own cost is checked against it.
  """
  url, server = start_teacher_server(config, teacher_dir, workdir)
  client_cfg = teacher_client_config(
    config.teacher, chunk_len=config.omniopd.chunk_len, workdir=workdir, base_url=url
  )
  client = tc.TeacherClient.from_config(client_cfg)
  try:
    if saved_state:
      client.load_state_dict(saved_state)
    info = client.probe()
  except BaseException:
    client.close()
    if server is not None:
      server.stop()
    raise
  print(
    f"teacher: {info['backend']} mode={info['mode']} approximate={info['approximate']}", flush=True
  )
  return client, scoring.make_scorer(config.scoring), server


def load_teacher_model(config, teacher_dir: str, mesh, rules, tokenizer):
  """The same-tokenizer teacher of teacher="model" methods, in process."""
  if not teacher_dir:
    raise ValueError("method=opd needs config.opd.teacher_path (an HF dir, same tokenizer)")
  with jax.set_mesh(mesh):
    model, teacher_tok = hf.load_pretrained(
      teacher_dir, config.model.dtype, mesh=mesh, rules=rules,
      scan_layers=config.model.get("scan_layers", False),
    )  # fmt: skip
  opd.check_same_tokenizer(tokenizer, teacher_tok)
  return model


def eval_share(config) -> list:
  """This process's share of the held-out problems (equal shares; metrics are averaged)."""
  examples = data.load_examples(config.data, "eval")[: config.eval.num_examples]
  usable = len(examples) - len(examples) % jax.process_count()
  return examples[:usable][jax.process_index() :: jax.process_count()]


def setup(config, workdir: str, stop_requested: threading.Event | None = None):
  """(Runtime, TrainState): the runtime of `config` in `workdir`, and the state to start from
  (auto-resume). `stop_requested` (default: a new Event) is what SIGTERM sets."""
  stop_requested = stop_requested or threading.Event()
  os.makedirs(workdir, exist_ok=True)
  method = registry.get(config.method)
  rules = sharding.rules_from_config(config.sharding_rules)
  mesh = sharding.make_mesh(config.mesh)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(resolved_config_json(config))
  student_dir, teacher_dir = resolve_models(config, workdir)
  tokenizer = hf.load_tokenizer(config.model.tokenizer_path or student_dir)
  if tokenizer is None:
    raise FileNotFoundError(f"no tokenizer files in {student_dir}: set config.model.tokenizer_path")
  with jax.set_mesh(mesh):
    model = hf.load_model(
      student_dir, config.model.dtype, config.model.param_dtype, mesh, rules,
      scan_layers=config.model.get("scan_layers", False),
    )  # fmt: skip
  graphdef, params = nnx.split(model)
  # A real copy (astype to the same dtype would alias): the state's buffers are donated.
  base_dtype = hf.DTYPES[config.model.base_dtype]
  base_params = jax.tree.map(lambda x: jnp.array(x, dtype=base_dtype, copy=True), params)
  state = train_step.init_state(params, train_step.make_optimizer(config.optimizer, config.num_steps),
                                config.seed)  # fmt: skip

  teacher = scorer = server = teacher_params = teacher_graphdef = logprobs_fn = None
  if method.teacher == "model":
    teacher_model = load_teacher_model(config, teacher_dir, mesh, rules, tokenizer)
    logprobs_fn = make_teacher_logprobs_fn(teacher_model)
    if method.needs_teacher_logits(config):
      # The teacher's own architecture (it may differ from the student's); shardings unchanged.
      teacher_graphdef, teacher_params = nnx.split(teacher_model)
  update = train_step.make_update_fn(config, mesh, graphdef, jax.eval_shape(lambda: state), rules,
                                     teacher_graphdef=teacher_graphdef)  # fmt: skip
  state = jax.device_put(state, update.shardings)
  per_process = config.batch_size // jax.process_count()
  data_iter = data.make_prompt_iterator(
    config.data, tokenizer, batch_size=per_process // method.samples_per_prompt(config),
    seed=config.seed, max_prompt_len=config.max_prompt_len,
  )  # fmt: skip
  ckpt = checkpoint.Checkpointer(workdir, every=config.checkpoint_every,
                                 keep=config.keep_checkpoints)  # fmt: skip
  state, saved = restore(ckpt, state, data_iter)
  if method.teacher == "api":
    teacher, scorer, server = start_api_teacher(config, teacher_dir, workdir, saved.get("teacher"))
  ctx = base.Context(
    config=config, tokenizer=tokenizer, eos_ids=hf.eos_token_ids(tokenizer, student_dir),
    rules=rules, rollout_mesh=mesh, process_index=jax.process_index(), teacher=teacher,
    scorer=scorer, backend=config.teacher.backend if teacher is not None else "",
    teacher_logprobs_fn=logprobs_fn, stop_requested=stop_requested,
  )  # fmt: skip
  writer = metrics.MetricsWriter(workdir, num_steps=config.num_steps, start_step=int(state.step),
                                 enabled=jax.process_index() == 0)  # fmt: skip
  runtime = Runtime(
    config=config, workdir=workdir, method=method, mesh=mesh, graphdef=graphdef, ctx=ctx,
    base_params=base_params, teacher_params=teacher_params, update=update, checkpointer=ckpt,
    data=data_iter, eval_examples=eval_share(config), writer=writer,
    stop_requested=stop_requested, server=server,
  )  # fmt: skip
  return runtime, state


def restore(ckpt: checkpoint.Checkpointer, state, data_iter) -> tuple[object, dict]:
  """(the latest checkpoint's state, its meta) with the data position restored, else (state, {})."""
  if ckpt.latest_step() is None:
    return state, {}
  state, meta = ckpt.restore(state)  # the live state carries the target shardings
  # Processes step in lockstep, so process 0's saved position is every process's position.
  data_iter.set_state({**meta["data"], "process_index": jax.process_index()})
  print(f"resumed from step {int(state.step)} ({ckpt.directory})", flush=True)
  return state, meta
