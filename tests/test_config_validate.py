"""Tests for configs/validate.py: every shipped config is valid, every enumerated field and numeric
range is checked with a message naming key, value, allowed values and the closest one, in
milliseconds, and `python -m omniopd_jax.main` stops on a bad config before building anything."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

from omniopd_jax.configs import math as math_config
from omniopd_jax.configs import validate
from omniopd_jax.data import prompts as data
from omniopd_jax.experiments import compare
from omniopd_jax.methods import losses, registry, sft
from omniopd_jax.models import hf, layer_scan
from omniopd_jax.reward import posterior, similarity
from omniopd_jax.rollout import forks
from omniopd_jax.teacher import backends

ROOT = pathlib.Path(__file__).parents[1]


def _config(variant="smoke", **overrides):
  config = math_config.get_config(variant)
  config.unlock()
  for key, value in overrides.items():
    *parents, leaf = key.split("__")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


@pytest.mark.parametrize(
  "variant", [*math_config.VARIANTS, "smoke,anthropic", "demo,gemini", "pod,anthropic"]
)
def test_shipped_variants_validate(variant):
  assert validate.problems(math_config.get_config(variant)) == []


@pytest.mark.parametrize("quick", [True, False])
def test_compare_runs_validate(quick):
  base = compare.base_config(quick)
  for v in compare.VARIANTS:
    config = compare.run_config(
      base, v, lr=1e-4, seed=0, steps=8, student="s", teacher="t", teacher_url="http://h:1/v1"
    )
    assert validate.problems(config) == [], v.name


# Every value each reader accepts is accepted here (the sets come from the readers themselves).
@pytest.mark.parametrize(
  "key, allowed",
  [
    ("method", tuple(registry.METHODS)),
    ("sft__target", tuple(sft.TARGETS)),
    ("model__build_demo_models", validate.DEMO_MODEL_KINDS),
    ("omniopd__weight_form", posterior.WEIGHT_FORMS),
    ("omniopd__fork_method", forks.METHODS),
    ("omniopd__reduction", losses.REDUCTIONS),
    ("scoring__phi", similarity.PHIS),
    ("scoring__embedding_backend", similarity.EMBEDDING_BACKENDS),
    ("teacher__backend", tuple(backends.BACKENDS)),
    ("opd__estimator", ("sampled", "full_vocab")),
    ("model__dtype", tuple(hf.DTYPES)),
    ("model__base_dtype", tuple(hf.DTYPES)),
    ("model__remat", (*layer_scan.REMAT_POLICIES, True, False)),  # booleans: "full" and "none"
    ("model__scan_layers", (True, False)),
    ("data__source", data.SOURCES),
  ],
)
def test_every_allowed_value_passes(key, allowed):
  for value in allowed:
    extra = {"data__train_path": "x.jsonl"} if key == "data__source" else {}
    assert validate.problems(_config(**{key: value}, **extra)) == [], value


@pytest.mark.parametrize(
  "key, value, expected",
  [
    ("method", "omnipod", "method='omnipod' is not one of ('omniopd', 'opd', 'grpo', 'sft'); "
     "did you mean 'omniopd'?"),
    ("omniopd__weight_form", "centred", "omniopd.weight_form='centred' is not one of ('pi_hat', "
     "'centered', 'group'); did you mean 'centered'?"),
    ("scoring__phi", "edits", "scoring.phi='edits' is not one of ('embedding', 'edit', 'rouge1', "
     "'exact'); did you mean 'edit'?"),
    ("scoring__embedding_backend", "sentence-transformers", "did you mean 'sentence_transformers'"),
    ("omniopd__fork_method", "peaks", "omniopd.fork_method='peaks' is not one of ('peak', "
     "'random'); did you mean 'peak'?"),
    ("omniopd__reduction", "token-mean", "did you mean 'token_mean'"),
    ("teacher__backend", "openai_completion", "did you mean 'openai_completions'"),
    ("teacher__prompt_format", "token_id", "teacher.prompt_format='token_id' is not one of "
     "('text', 'token_ids'); did you mean 'token_ids'?"),
    ("opd__estimator", "full-vocab", "did you mean 'full_vocab'"),
    ("model__dtype", "bf16", "model.dtype='bf16' is not one of ('float32', 'bfloat16', "
     "'float16'); did you mean 'bfloat16'?"),
    ("model__param_dtype", "float", "model.param_dtype='float'"),
    ("model__remat", "dot", "model.remat='dot' is not one of ('none', 'full', 'dots', "
     "'dots_except_mlp'); did you mean 'dots'?"),
    ("sft__target", "gold", "sft.target='gold' is not one of ('answer', 'worked')"),
    ("teacher__max_failed_fraction", 1.5, "teacher.max_failed_fraction=1.5"),
    ("data__source", "jsonlines", "did you mean 'jsonl'"),
    ("num_steps", -1, "num_steps=-1 must be >= 1"),
    ("num_steps", 0, "num_steps=0 must be >= 1"),
    ("batch_size", 0, "batch_size=0 must be >= 1"),
    ("micro_batches", 3, "batch_size=8 must divide evenly into micro_batches=3"),
    ("optimizer__learning_rate", 0.0, "optimizer.learning_rate=0.0 must be > 0"),
    ("optimizer__learning_rate", -1e-4, "optimizer.learning_rate=-0.0001 must be > 0"),
    ("optimizer__b2", 1.0, "optimizer.b2=1.0 must be in [0, 1)"),
    ("omniopd__chunk_len", 0, "omniopd.chunk_len=0 must be >= 1"),
    ("omniopd__chunk_len", 33, "omniopd.chunk_len=33 > rollout.max_new_tokens=32"),
    ("omniopd__num_teacher_samples", 0, "omniopd.num_teacher_samples=0 must be >= 1"),
    ("omniopd__alpha", -1.0, "omniopd.alpha=-1.0 must be >= 0"),
    ("rollout__top_p", 0.0, "rollout.top_p=0.0 must be in (0, 1]"),
    ("rollout__temperature", -0.5, "rollout.temperature=-0.5 must be >= 0 (0 means greedy)"),
    ("scoring__phi_floor", 1.0, "scoring.phi_floor=1.0 must be in [0, 1)"),
    ("teacher__timeout_s", 0.0, "teacher.timeout_s=0.0 must be > 0"),
    ("teacher__budget_usd", -1.0, "teacher.budget_usd=-1.0 must be >= 0"),
    ("teacher__max_in_flight", 0, "teacher.max_in_flight=0 must be >= 1"),
    ("teacher__base_url", "127.0.0.1:8000/v1", "must start with http:// or https://"),
    ("grpo__group_size", 1, "grpo.group_size=1 must be >= 2"),
    ("max_prompt_len", 0, "max_prompt_len=0 must be >= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints=0 must be >= 1"),
    ("seed", -3, "seed=-3 must be >= 0"),
    ("eval__num_samples", 0, "eval.num_samples=0 must be >= 1"),
    ("data__max_chars", -1, "data.max_chars=-1 must be >= 0"),
    ("data__task_weights", "1,x", "data.task_weights='1,x' must be comma-separated"),
    ("mesh", [("data", -1), ("fdsp", 1), ("tensor", 1)], "mesh axis 'fdsp' is not one of "
     "('data', 'fsdp', 'tensor'); did you mean 'fsdp'?"),
    ("mesh", [("data", -1), ("fsdp", -1), ("tensor", 1)], "at most one -1"),
    ("sharding_rules", [("batch", "dta")], "mesh axis 'dta' is not one of"),
  ],
)  # fmt: skip
def test_bad_values_are_named_with_allowed_values(key, value, expected):
  found = validate.problems(_config(**{key: value}))
  assert any(expected in problem for problem in found), found
  with pytest.raises(validate.ConfigError, match="invalid config"):
    validate.validate_config(_config(**{key: value}))


def test_flags_must_be_booleans():
  config = _config()
  # ConfigDict refuses a retyped field; a config rebuilt from JSON or a dict can still hold one.
  config.rollout = type(config.rollout)({**config.rollout.to_dict(), "overlap_teacher": "yes"})
  assert "rollout.overlap_teacher='yes' must be True or False" in validate.problems(config)


def test_cross_field_rules():
  def problems(**kw):
    return "\n".join(validate.problems(_config(**kw)))

  assert "omniopd.num_drafts=1 must be >= 2" in problems(
    omniopd__weight_form="group", omniopd__num_drafts=1
  )
  assert problems(omniopd__num_drafts=1) == ""  # only the group form uses drafts
  assert "multiple of grpo.group_size=3" in problems(method="grpo", grpo__group_size=3)
  assert "needs teacher.backend in ('openai_completions',)" in problems(
    teacher__prompt_format="token_ids", teacher__backend="anthropic"
  )
  assert "teacher.base_url is empty" in problems(teacher__serve_local=False)
  assert problems(method="sft", teacher__serve_local=False) == ""  # sft asks no teacher
  assert "data.train_path is empty" in problems(data__source="parquet")


def test_every_problem_reported_at_once_and_quickly():
  config = _config(method="omnipod", num_steps=-1, scoring__phi="cosine")
  config.omniopd.weight_form = "centred"
  start = time.perf_counter()
  with pytest.raises(validate.ConfigError) as info:
    validate.validate_config(config)
  assert time.perf_counter() - start < 1.0
  message = str(info.value)
  assert message.startswith("invalid config (4 problems)")
  for key in ("method=", "num_steps=", "scoring.phi=", "omniopd.weight_form="):
    assert key in message
  assert "closest: " in message  # 'cosine' resembles no phi: the nearest is still offered


def test_main_stops_on_bad_config_before_any_work(tmp_path):
  workdir = tmp_path / "run"
  cmd = [
    sys.executable, "-m", "omniopd_jax.main", "--config=configs/math.py:smoke",
    f"--workdir={workdir}", "--config.omniopd.weight_form=centred", "--config.num_steps=-1",
  ]  # fmt: skip
  start = time.perf_counter()
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  elapsed = time.perf_counter() - start
  assert out.returncode == 1, out.stderr[-3000:]
  assert "omniopd.weight_form='centred' is not one of" in out.stderr
  assert "did you mean 'centered'?" in out.stderr and "num_steps=-1 must be >= 1" in out.stderr
  assert "Traceback" not in out.stderr  # a message, not a crash
  assert "omniopd_jax: process" not in out.stdout  # stopped before devices were set up
  assert not os.path.exists(workdir)  # nothing written: no config.json, models or checkpoints
  # The Python start-up and imports dominate; the check itself takes milliseconds (above). A
  # run that got as far as building models took 24-85 s.
  assert elapsed < 60, elapsed
