"""Config validation right after parsing, before any model, teacher or data is touched.

  from omniopd_jax.configs import validate
  validate.validate_config(config)  # raises ConfigError naming every bad key at once

Every enumerated field is checked against the set its reader accepts (imported from that reader,
so the two cannot drift apart) with a closest-match suggestion, and every numeric field against
its range. Pure Python over the config: milliseconds, no devices, no files.
"""

import difflib
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from omniopd_jax import sharding
from omniopd_jax.data import prompts as data
from omniopd_jax.methods import losses, registry, sft
from omniopd_jax.models import hf, layer_scan
from omniopd_jax.ops import attention
from omniopd_jax.reward import posterior, similarity
from omniopd_jax.rollout import decode_sharding, forks, paged_cache, sampler
from omniopd_jax.teacher import backends

# Readers without an exported constant: methods/opd.py and train/step.py compare opd.estimator
# with these; teacher.prompt_format is read by methods/omniopd.py; model.build_demo_models by
# experiments/demo_models.build (imported only when used: it trains models).
OPD_ESTIMATORS = ("sampled", "full_vocab")
PROMPT_FORMATS = ("text", "token_ids")
DEMO_MODEL_KINDS = ("", "tiny", "trained")
HEADS = ("tiled", "dense")  # train/step.make_loss_fn
# Backends that can continue a prompt given as token ids (methods/collect.py `_uses_ids`).
TOKEN_ID_BACKENDS = ("openai_completions",)


class ConfigError(ValueError):
  """One or more config fields hold values the run cannot use."""


_MISSING = object()


def _get(config, key: str) -> Any:
  """config["a.b.c"], or _MISSING when any part is absent (partial configs skip that check)."""
  node = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def suggestion(value: Any, allowed: Sequence[str]) -> str:
  """'did you mean X?' for a near miss, else 'closest: X' (always one allowed value)."""
  near = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.6)
  if near:
    return f"did you mean {near[0]!r}?"
  return f"closest: {difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.0)[0]!r}"


class _Checker:
  """Collects every problem so one run reports them all."""

  def __init__(self, config):
    self.config = config
    self.problems: list[str] = []

  def value(self, key: str):
    return _get(self.config, key)

  def choice(self, key: str, allowed: Sequence[str]):
    value = self.value(key)
    if value is _MISSING or value in allowed:
      return
    self.problems.append(
      f"{key}={value!r} is not one of {tuple(allowed)}; {suggestion(value, allowed)}"
    )

  def number(self, key: str, ok: Callable[[float], bool], wanted: str, integer: bool = False):
    value = self.value(key)
    if value is _MISSING:
      return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
      self.problems.append(f"{key}={value!r} must be {'an integer' if integer else 'a number'}")
    elif not ok(value):
      self.problems.append(f"{key}={value!r} must be {wanted}")

  def int_at_least(self, key: str, low: int, why: str = ""):
    self.number(key, lambda v: v >= low, f">= {low}{why}", integer=True)

  def positive(self, key: str):
    self.number(key, lambda v: v > 0, "> 0")

  def non_negative(self, key: str):
    self.number(key, lambda v: v >= 0, ">= 0")

  def fraction(self, key: str, low_open=False, high_open=False):
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")

    def ok(v):
      return (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)

    self.number(key, ok, f"in {lo}0, 1{hi}")

  def flag(self, key: str):
    value = self.value(key)
    if value is not _MISSING and not isinstance(value, bool):
      self.problems.append(f"{key}={value!r} must be True or False")

  def require(self, condition: bool, message: str):
    if not condition:
      self.problems.append(message)


def _check_top_level(c: _Checker):
  c.choice("method", tuple(registry.METHODS))
  c.int_at_least("seed", 0)
  c.int_at_least("num_steps", 1)
  c.int_at_least("batch_size", 1)
  c.int_at_least("micro_batches", 1)
  c.int_at_least("checkpoint_every", 0, " (0: only at the end)")
  c.int_at_least("keep_checkpoints", 1)
  c.int_at_least("eval_every", 0, " (0: only before and after training)")
  c.int_at_least("log_every", 1)
  c.int_at_least("num_text_samples", 0)
  c.int_at_least("max_prompt_len", 1)
  batch, micro = c.value("batch_size"), c.value("micro_batches")
  if _ints(batch, micro) and micro >= 1 and batch % micro:
    c.problems.append(f"batch_size={batch} must divide evenly into micro_batches={micro}")
  _check_packing(c)


def _check_packing(c: _Checker):
  c.int_at_least("pack_tokens", 0, " (0: the padded row length)")
  budget, prompt = c.value("pack_tokens"), c.value("max_prompt_len")
  response = c.value("rollout.max_new_tokens")
  if c.value("pack_sequences") is True and _ints(budget, prompt, response) and budget:
    c.require(
      budget >= prompt + response,
      f"pack_tokens={budget} must be 0 or at least max_prompt_len + rollout.max_new_tokens = "
      f"{prompt + response}: a row of that length must fit one packed row",
    )
  if c.value("pack_sequences") is True and c.value("model.attention") in ("xla", "cudnn"):
    c.problems.append(
      f"pack_sequences=True needs an attention with segment ids; model.attention="
      f"{c.value('model.attention')!r} takes one span per row (use auto, dense, blockwise, "
      "splash or pallas_gpu)"
    )


def _check_model_and_rollout(c: _Checker):
  for key in ("model.dtype", "model.param_dtype", "model.base_dtype"):
    c.choice(key, tuple(hf.DTYPES))
  c.choice("model.build_demo_models", DEMO_MODEL_KINDS)
  c.choice("model.head", HEADS)
  c.choice("model.attention", attention.IMPLEMENTATIONS)
  c.int_at_least("model.head_vocab_tile", 0, " (0: the default tile)")
  c.int_at_least("model.mlp_chunk", 0, " (0: the whole sequence at once)")
  c.int_at_least("model.layer_chunk", 0, " (0: layers run whole)")
  remat = c.value("model.remat")
  if remat is not _MISSING and not isinstance(remat, bool):
    c.choice("model.remat", layer_scan.REMAT_POLICIES)
  scan = c.value("model.scan_layers")
  c.require(
    scan is _MISSING or isinstance(scan, bool), f"model.scan_layers={scan!r} must be a bool"
  )
  c.int_at_least("rollout.max_new_tokens", 1)
  c.number("rollout.temperature", lambda v: v >= 0, ">= 0 (0 means greedy)")
  c.fraction("rollout.top_p", low_open=True)
  c.int_at_least("rollout.top_k", 0, " (0: no top-k filter)")
  c.choice("rollout.engine", sampler.ENGINES)
  c.choice("rollout.attention", paged_cache.ATTENTION_IMPLS)
  c.choice("rollout.decode_layout", decode_sharding.LAYOUTS)
  c.int_at_least("rollout.num_slots", 0, " (0: one slot per row)")
  c.int_at_least("rollout.num_pages", 0, " (0: enough for every slot at its cap)")
  c.int_at_least("rollout.page_size", 1)
  c.int_at_least("rollout.steps_per_sync", 1)
  c.flag("rollout.overlap_teacher")


def _check_omniopd(c: _Checker):
  c.int_at_least("omniopd.num_forks", 1)
  c.int_at_least("omniopd.chunk_len", 1)
  c.int_at_least("omniopd.num_teacher_samples", 1)
  c.non_negative("omniopd.alpha")
  c.non_negative("omniopd.beta")
  c.choice("omniopd.weight_form", posterior.WEIGHT_FORMS)
  c.choice("omniopd.token_credit", posterior.TOKEN_CREDITS)
  if c.value("omniopd.token_credit") != "none" and c.value("omniopd.weight_form") == "group":
    c.problems.append(
      "omniopd.token_credit works with weight_form 'pi_hat' or 'centered', not 'group'; "
      "set omniopd.token_credit=none for the group form"
    )
  c.choice("omniopd.fork_method", forks.METHODS)
  c.choice("omniopd.reduction", losses.REDUCTIONS)
  c.non_negative("omniopd.norm_constant")
  if c.value("omniopd.weight_form") == "group":
    c.int_at_least("omniopd.num_drafts", 2, " for weight_form='group' (own chunk + alternatives)")
  chunk, length = c.value("omniopd.chunk_len"), c.value("rollout.max_new_tokens")
  if c.value("method") == "omniopd" and _ints(chunk, length) and chunk > length:
    c.problems.append(
      f"omniopd.chunk_len={chunk} > rollout.max_new_tokens={length}: no chunk can fit in a "
      "response, so no fork would ever be audited"
    )
  c.choice("scoring.phi", similarity.PHIS)
  c.choice("scoring.embedding_backend", similarity.EMBEDDING_BACKENDS)
  c.fraction("scoring.phi_floor", high_open=True)


def _check_teacher(c: _Checker):
  c.choice("teacher.backend", tuple(sorted(backends.BACKENDS)))
  c.choice("teacher.prompt_format", PROMPT_FORMATS)
  fmt, backend = c.value("teacher.prompt_format"), c.value("teacher.backend")
  c.require(
    fmt != "token_ids" or backend in TOKEN_ID_BACKENDS,
    f"teacher.prompt_format='token_ids' needs teacher.backend in {TOKEN_ID_BACKENDS}, got "
    f"{backend!r} (which only takes text)",
  )
  c.int_at_least("teacher.max_in_flight", 1)
  for key in ("rpm", "input_tpm", "output_tpm", "max_tokens", "prompts_per_request"):
    c.int_at_least(f"teacher.{key}", 0, " (0: none / default)")
  c.int_at_least("teacher.max_retries", 0)
  c.int_at_least("teacher.halt_after_failed_calls", 0, " (0: never halt on failed calls)")
  c.fraction("teacher.max_failed_fraction")
  c.positive("teacher.timeout_s")
  for key in ("price_in_per_mtok", "price_out_per_mtok", "budget_usd", "temperature"):
    c.non_negative(f"teacher.{key}")
  url = c.value("teacher.base_url")
  if isinstance(url, str) and url:
    c.require(
      url.startswith(("http://", "https://")),
      f"teacher.base_url={url!r} must start with http:// or https://",
    )
  elif c.value("method") == "omniopd" and url == "" and not c.value("teacher.serve_local"):
    c.problems.append(
      "teacher.base_url is empty: method=omniopd needs a teacher URL (e.g. "
      "http://127.0.0.1:8000/v1 from `python -m omniopd_jax.serve`)"
    )


def _check_baselines(c: _Checker):
  c.choice("opd.estimator", OPD_ESTIMATORS)
  c.int_at_least("grpo.group_size", 2, " (a group-normalised advantage needs 2 samples)")
  c.positive("grpo.clip_eps")
  c.non_negative("grpo.beta")
  c.choice("sft.target", tuple(sft.TARGETS))
  batch, group = c.value("batch_size"), c.value("grpo.group_size")
  if c.value("method") == "grpo" and _ints(batch, group) and group >= 1 and batch % group:
    c.problems.append(
      f"batch_size={batch} counts GRPO samples and must be a multiple of grpo.group_size={group}"
    )
  c.positive("optimizer.learning_rate")
  c.int_at_least("optimizer.warmup_steps", 0)
  c.fraction("optimizer.min_lr_ratio")
  c.non_negative("optimizer.weight_decay")
  c.fraction("optimizer.b1", high_open=True)
  c.fraction("optimizer.b2", high_open=True)
  c.non_negative("optimizer.grad_clip")


def _check_mesh(c: _Checker):
  mesh = c.value("mesh")
  if mesh is not _MISSING:
    try:
      names = [name for name, _ in mesh]
      sizes = [size for _, size in mesh]
    except (TypeError, ValueError):
      c.problems.append(f"mesh={mesh!r} must be a list of (axis, size) pairs")
      return
    for name in names:
      c.require(
        name in sharding.MESH_AXES,
        f"mesh axis {name!r} is not one of {sharding.MESH_AXES}; "
        f"{suggestion(name, sharding.MESH_AXES)}",
      )
    c.require(
      sorted(names) == sorted(sharding.MESH_AXES),
      f"mesh={mesh!r} must name each of {sharding.MESH_AXES} once",
    )
    c.require(
      all(_ints(s) and (s == -1 or s >= 1) for s in sizes) and sizes.count(-1) <= 1,
      f"mesh sizes {sizes} must be >= 1, with at most one -1 (all remaining devices)",
    )
  rules = c.value("sharding_rules")
  if rules is _MISSING:
    return
  for rule in rules:
    axes = rule[1] if len(rule) == 2 else _MISSING
    axes = [axes] if isinstance(axes, str) or axes is None else axes
    for axis in axes if axes is not _MISSING else [_MISSING]:
      c.require(
        axis is None or axis in sharding.MESH_AXES,
        f"sharding_rules entry {tuple(rule)!r}: mesh axis {axis!r} is not one of "
        f"{sharding.MESH_AXES} or None",
      )


def _check_data_and_eval(c: _Checker):
  c.choice("data.source", data.SOURCES)
  c.int_at_least("data.size", 1)
  c.int_at_least("data.eval_size", 0, " (0: the whole held-out split)")
  c.int_at_least("data.eval_seed", -1, " (-1: right after the training problems)")
  c.int_at_least("data.eval_exclude_seed", 0)
  c.int_at_least("data.eval_exclude_size", 0, " (0: none)")
  c.int_at_least("data.num_epochs", 0, " (0: repeat forever)")
  c.int_at_least("data.prefetch", 0)
  c.int_at_least("data.max_chars", 0, " (0: no limit)")
  source = c.value("data.source")
  if source in ("jsonl", "parquet"):
    c.require(
      bool(c.value("data.train_path")),
      f"data.train_path is empty: data.source={source!r} needs a .{source} file of problems",
    )
  weights = c.value("data.task_weights")
  if isinstance(weights, str) and weights.strip():
    try:
      parsed = [float(w) for w in weights.split(",") if w.strip()]
    except ValueError:
      parsed = None
    c.require(
      parsed is not None and all(w >= 0 for w in parsed) and sum(parsed) > 0,
      f"data.task_weights={weights!r} must be comma-separated non-negative numbers, not all 0",
    )
  c.int_at_least("eval.num_examples", 0, " (0: the whole eval split)")
  c.int_at_least("eval.num_samples", 1)
  c.number("eval.temperature", lambda v: v >= 0, ">= 0")
  c.int_at_least("eval.max_new_tokens", 0, " (0: rollout.max_new_tokens)")
  c.int_at_least("eval.batch_size", 1)
  for key in ("teacher_examples", "teacher_steps", "student_steps", "sft_batch_size"):
    c.int_at_least(f"demo.{key}", 1)
  c.choice("demo.teacher_style", ("student", "shifted"))
  c.require(
    c.value("demo.teacher_style") == "student" or c.value("demo.teacher_path") != "bundled",
    "demo.teacher_style='shifted' needs demo.teacher_path '' (train it) or a shifted teacher's dir",
  )
  c.positive("demo.teacher_lr")
  c.positive("demo.student_lr")


def _ints(*values) -> bool:
  return all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)


CHECKS = (
  _check_top_level,
  _check_model_and_rollout,
  _check_omniopd,
  _check_teacher,
  _check_baselines,
  _check_mesh,
  _check_data_and_eval,
)


def problems(config) -> list[str]:
  """Every problem found in `config` (empty when it is usable)."""
  checker = _Checker(config)
  for check in CHECKS:
    check(checker)
  return checker.problems


def validate_config(config) -> None:
  """Raise ConfigError listing every bad field of `config` (keys, values, allowed values)."""
  found = problems(config)
  if found:
    lines = "\n  ".join(found)
    raise ConfigError(f"invalid config ({len(found)} problem{'s' * (len(found) > 1)}):\n  {lines}")


def validate_or_exit(config) -> None:
  """validate_config for entry points: a bad config ends the process with the message, exit 1."""
  try:
    validate_config(config)
  except ConfigError as e:
    raise SystemExit(f"omniopd_jax: {e}") from None
