"""The training loop: prompts -> rollouts -> forks -> teacher (async) -> similarity -> posterior ->
update -> metrics, checkpoints, evaluation. `run(config, workdir)` is the whole program:

  runtime, state = setup(config, workdir)       # train/setup.py: models, mesh, data, teacher, ...
  state = train(runtime, state)                 # each step: collect -> wait -> update -> finish
  save, evaluate                                # a StopTraining ends it early, checkpointed

On-policy by default: step t's rollouts come from the parameters after update t-1. Within a step
the host overlaps scoring of finished teacher requests with requests still in flight.
`one_step_off=True` instead samples step t+1 and submits its teacher requests before waiting for
step t's teacher, so the teacher of t+1 runs during update t (the step-t+1 samples are one update
stale) and two steps of teacher requests overlap.

A run stops early by exception (`StopTraining`): on SIGTERM, when the teacher client halts (auth,
budget, refused mode), or when more than `teacher.max_failed_fraction` of a step's teacher
samples fail. The last complete step is checkpointed first, so rerunning the command resumes.
"""

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from omniopd_jax.configs import validate
from omniopd_jax.eval import evaluate
from omniopd_jax.methods import base
from omniopd_jax.train import setup as setup_lib

log = logging.getLogger("omniopd_jax")


class StopTraining(Exception):
  """Ends a run early; the loop has checkpointed the last complete step when it propagates."""

  def __init__(self, reason: str, exit_code: int = 1):
    super().__init__(reason)
    self.reason = reason
    self.exit_code = exit_code


@dataclasses.dataclass
class Trained:
  """A step whose update was issued; its bookkeeping (metrics, checkpoint, eval) may be pending."""

  step: int
  got: base.Collected
  device_metrics: dict  # on device until finish_step reads them
  data_state: dict  # the prompt iterator's position after this step's prompts
  t_update: float  # perf_counter when the update was issued
  t_step: float  # perf_counter when the step began


def run(config, workdir: str) -> dict:
  """Train `config` in `workdir` (auto-resuming); returns the final metrics.

  Raises StopTraining (after checkpointing) when the run cannot go on; its message names the
  cause and the command that resumes.
  """
  validate.validate_config(config)  # main.py checks first; this covers callers that skip it
  stop_requested = threading.Event()
  with sigterm_sets(stop_requested):
    runtime, state = setup_lib.setup(config, workdir, stop_requested=stop_requested)
    try:
      return train_and_evaluate(runtime, state)
    finally:
      runtime.close()


def train_and_evaluate(rt: setup_lib.Runtime, state) -> dict:
  final: dict = {}
  config = rt.config
  if int(state.step) == 0 and rt.eval_examples:
    final["eval_before"] = evaluate_and_log(rt, state, 0)
    print(f"eval before training: {fmt(final['eval_before'])}", flush=True)
  if config.one_step_off and int(state.step) < config.num_steps:
    print("one_step_off: the teacher for step t+1 overlaps update t (samples one update stale)",
          flush=True)  # fmt: skip
  state = train(rt, state)
  rt.checkpointer.maybe_save(config.num_steps, state, meta(rt, rt.data.get_state()), force=True)
  if rt.eval_examples:
    final["eval_after"] = evaluate_and_log(rt, state, config.num_steps)
    print(f"eval after training: {fmt(final['eval_after'])}", flush=True)
  rt.writer.flush()
  final.update(rt.writer.last)
  return final


def train(rt: setup_lib.Runtime, state):
  """Steps state.step + 1 .. num_steps; returns the final state.

  On StopTraining, checkpoints the last complete step (the state after its update, with the data
  position after its prompts) and re-raises.
  """
  config = rt.config
  following = None  # one_step_off: finish() of the next step's collection, already started
  unfinished: Trained | None = None  # one_step_off: bookkeeping waits for the next step's wait
  last_data_state = rt.data.get_state()
  try:
    for step in range(int(state.step) + 1, config.num_steps + 1):
      check_stop_requested(rt)
      t_step = time.perf_counter()
      finish = following or start_collection(rt, state, step)
      data_state = rt.data.get_state()
      following = None
      if config.one_step_off and step < config.num_steps:
        # Sample step t+1 now (device; the parameters after update t-1) and submit its teacher
        # requests before waiting for step t's: the teacher works on two steps at once, and the
        # requests of t+1 are in flight through this wait, update t and the next rollout.
        following = start_collection(rt, state, step + 1)
      got = wait_for_collection(rt, finish, step)
      if unfinished is not None:
        unfinished, done = None, unfinished
        finish_step(rt, state, done)
      t_update = time.perf_counter()
      state, device_metrics = rt.update(state, rt.base_params, got.batch, rt.teacher_params)
      last_data_state = data_state
      trained = Trained(step, got, device_metrics, data_state, t_update, t_step)
      if following is None:  # on-policy: finish now
        finish_step(rt, state, trained)
      else:
        unfinished = trained
    if unfinished is not None:
      unfinished, done = None, unfinished
      finish_step(rt, state, done)
  except StopTraining as stop:
    if unfinished is not None:  # its update is in `state`: record it before checkpointing
      with contextlib.suppress(StopTraining):
        finish_step(rt, state, unfinished)
    if int(state.step) > 0:  # step 0 is the base model: nothing to save
      rt.checkpointer.maybe_save(int(state.step), state, meta(rt, last_data_state), force=True)
      rt.checkpointer.wait()
    stop.reason = f"{stop.reason}\n{resume_hint(rt, int(state.step))}"
    stop.args = (stop.reason,)
    raise
  return state


def start_collection(rt: setup_lib.Runtime, state, step: int):
  """Rollouts (device) and teacher submission for `step`; returns its finish()."""
  model = nnx.merge(rt.graphdef, state.params)
  batch = next(rt.data)
  finish = rt.method.collect(rt.ctx, model, batch, step)

  def finish_and_count():
    got = finish()
    # Prompts cut to config.max_prompt_len by the iterator (warned about once, counted per step).
    got.metrics["data/truncated_prompts"] = float(batch.get("num_truncated", 0))
    return got

  return finish_and_count


def wait_for_collection(rt: setup_lib.Runtime, finish, step: int) -> base.Collected:
  """The host half of a step (teacher wait + scoring), refusing to train without the teacher."""
  try:
    got = finish()
  except base.WaitCancelled:
    check_stop_requested(rt)
    raise
  check_stop_requested(rt)
  asked, failed = got.teacher_samples
  limit = rt.config.teacher.max_failed_fraction
  if asked and (failed == asked or failed > limit * asked):
    halted = rt.ctx.teacher.halted if rt.ctx.teacher is not None else None
    cause = f"the teacher client halted: {halted}" if halted else (
      f"{failed} of {asked} teacher samples failed at step {step} "
      f"(teacher.max_failed_fraction={limit:g})"
    )  # fmt: skip
    example = next((t["teacher_failure_example"] for t in got.texts
                    if "teacher_failure_example" in t), "")  # fmt: skip
    raise StopTraining(
      f"training stopped without its teacher: {cause}"
      + (f"; e.g. {example}" if example else "")
      + f". Step {step} was not trained."
    )
  return got


def check_stop_requested(rt: setup_lib.Runtime) -> None:
  if rt.stop_requested.is_set():
    raise StopTraining("SIGTERM received: stopped", exit_code=128 + signal.SIGTERM)


def finish_step(rt: setup_lib.Runtime, state, done: Trained) -> None:
  """Everything after update `done.step`: NaN guard, metrics, checkpoint, eval, stop checks."""
  config, step, got = rt.config, done.step, done.got
  jax.block_until_ready(done.device_metrics["train/loss"])
  host = dict(got.metrics)
  host.update({f"time/{k}_s": v for k, v in got.timings.items()})
  host["time/update_s"] = time.perf_counter() - done.t_update
  host["time/step_s"] = time.perf_counter() - done.t_step
  if rt.ctx.teacher is not None:
    host.update(rt.ctx.teacher.metrics(reset=True))
  step_meta = meta(rt, done.data_state)
  if not bool(done.device_metrics["train/loss_finite"]):
    # The update left the state untouched, so `state` is the last good one.
    good = int(state.step)
    rt.checkpointer.maybe_save(good, state, step_meta, force=True)
    rt.checkpointer.wait()
    raise FloatingPointError(
      f"non-finite loss or gradient at step {step}: stopped; the last good state (step {good}) "
      f"is saved in {rt.checkpointer.directory}. Lower the learning rate or check the data."
    )
  rt.writer.push(step, done.device_metrics, host)
  if step % config.log_every == 0 or step == config.num_steps:
    rt.writer.flush()
    rt.writer.write_texts(step, got.texts)
    rt.writer.progress(step)
  rt.checkpointer.maybe_save(step, state, step_meta)
  if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
    print(f"eval at step {step}: {fmt(evaluate_and_log(rt, state, step))}", flush=True)
  halted = rt.ctx.teacher.halted if rt.ctx.teacher is not None else None
  if halted:
    rt.writer.flush()
    raise StopTraining(f"the teacher client halted after step {step}: {halted}")
  check_stop_requested(rt)


def meta(rt: setup_lib.Runtime, data_state: dict) -> dict:
  """The checkpoint's JSON sidecar: data position and teacher counters."""
  out = {"data": data_state}
  if rt.ctx.teacher is not None:
    out["teacher"] = rt.ctx.teacher.state_dict()
  return out


def evaluate_and_log(rt: setup_lib.Runtime, state, step: int) -> dict:
  """Held-out evaluation of the current parameters, averaged over processes, logged."""
  config, ctx = rt.config, rt.ctx
  model = nnx.merge(rt.graphdef, state.params)
  generate = evaluate.sampler_generate_fn(
    model, ctx.tokenizer, ctx.rollout_mesh, eos_ids=ctx.eos_ids, rules=ctx.rules,
    prompt_len=config.max_prompt_len,
  )  # fmt: skip
  res = evaluate.evaluate(
    generate, ctx.tokenizer, rt.eval_examples, num_samples=config.eval.num_samples,
    temperature=config.eval.temperature,
    max_new_tokens=config.eval.max_new_tokens or config.rollout.max_new_tokens,
    batch_size=config.eval.batch_size, data_cfg=config.data, seed=config.seed,
  )  # fmt: skip
  scalars = {k: float(v) for k, v in res.items() if isinstance(v, (int, float))}
  if jax.process_count() > 1:  # weighted by each process's share
    n = float(len(rt.eval_examples))
    keys = sorted(scalars)
    local = np.array([n] + [scalars[k] * n for k in keys], np.float64)
    total = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(local)).sum(0)
    scalars = {k: float(total[i + 1] / max(total[0], 1.0)) for i, k in enumerate(keys)}
    scalars["eval/num_examples"] = float(total[0])
  rt.writer.write(step, scalars)
  if rt.is_main:
    with open(os.path.join(rt.workdir, "eval.jsonl"), "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")
  return scalars


def resume_hint(rt: setup_lib.Runtime, step: int) -> str:
  """Where the checkpoint is and the command that resumes from it."""
  if os.path.basename(sys.argv[0]) == "main.py" or "omniopd_jax.main" in sys.argv[0]:
    command = shlex.join([sys.executable, "-m", "omniopd_jax.main", *sys.argv[1:]])
  else:
    command = f"the same command (same workdir {rt.workdir})"
  where = f"Checkpointed step {step} in {rt.checkpointer.directory}" if step else "Nothing trained"
  return f"{where}; fix the cause, then resume with: {command}"


@contextlib.contextmanager
def sigterm_sets(event: threading.Event):
  """SIGTERM sets `event` (pending teacher waits give up; the loop checkpoints and stops)."""
  if threading.current_thread() is not threading.main_thread():
    yield  # signal handlers can only be set from the main thread
    return

  def on_sigterm(signum, frame):
    del signum, frame
    event.set()

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def fmt(scalars: dict) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))


def setup_logging():
  logging.basicConfig(
    stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
  )
  np.set_printoptions(precision=4, suppress=True)
