"""experiments.compare: the different-tokenizer teacher is the same function under another vocabulary,
the summary statistics, and the --quick run end to end (every row, opd refusing, the style-shift
teacher trained and served, files written)."""

import json
import os

import numpy as np
import pytest

from omniopd_jax.experiments import compare


@pytest.fixture(scope="module")
def smoke_models(tmp_path_factory):
  from omniopd_jax.configs import math as math_config
  from omniopd_jax.experiments import demo_models

  workdir = tmp_path_factory.mktemp("cmp_models")
  student, teacher = demo_models.build(str(workdir), math_config.get_config("smoke"), log=print)
  return workdir, student, teacher


def test_permuted_tokenizer_teacher_is_the_same_function(smoke_models):
  import jax.numpy as jnp

  from omniopd_jax.models import hf

  workdir, _, teacher = smoke_models
  other = compare.permuted_tokenizer_teacher(teacher, str(workdir / "other"))
  model_a, tok_a = hf.load_pretrained(teacher)
  model_b, tok_b = hf.load_pretrained(other)
  assert tok_a.get_vocab() != tok_b.get_vocab()  # opd must refuse this pair
  assert set(tok_a.get_vocab()) == set(tok_b.get_vocab())
  assert tok_b.eos_token_id == tok_a.eos_token_id  # specials keep their ids
  text = "Q: 12 + 7 - 30 =\nA: 12 + 7 = 19\n"
  ids_a, ids_b = tok_a.encode(text), tok_b.encode(text)
  assert ids_a != ids_b and tok_b.decode(ids_b) == text
  logits_a = np.asarray(model_a(jnp.asarray([ids_a])))[0]  # [T, V]
  logits_b = np.asarray(model_b(jnp.asarray([ids_b])))[0]  # [T, V]
  vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
  order = [vocab_b[t] for t, _ in sorted(vocab_a.items(), key=lambda kv: kv[1])]
  np.testing.assert_allclose(logits_b[:, order], logits_a, rtol=1e-5, atol=1e-5)


def test_summarize_mean_std_and_refusals(tmp_path):
  runs = [
    dict(variant="sft", group="method", method="sft", lr=1e-3, seed=s, before=0.2, after=a,
         wall_s=10.0, teacher_tokens=0.0, curve=[(0, 0.2), (4, a)])
    for s, a in enumerate([0.3, 0.5, 0.4])
  ] + [dict(variant="other-tokenizer-opd", group="tokenizer", method="opd", lr=3e-4, seed=0,
            error="method=opd (white-box OPD) needs a teacher with the student's tokenizer")]  # fmt: skip
  rows = {r["variant"]: r for r in compare.summarize(runs)}
  assert rows["sft"]["after_mean"] == pytest.approx(0.4)
  assert rows["sft"]["after_std"] == pytest.approx(np.std([0.3, 0.5, 0.4], ddof=1))
  assert rows["sft"]["seeds"] == 3
  assert "error" in rows["other-tokenizer-opd"]
  path = tmp_path / "r.md"
  compare.write_markdown(list(rows.values()), str(path), "# t")
  text = path.read_text()
  assert "| sft | 0.001 | 3 | 0.200 | 0.400 +- 0.100 | +0.200 |" in text
  assert "refused: method=opd" in text
  compare.plot(runs, list(rows.values()), str(tmp_path / "a.png"))
  assert (tmp_path / "a.png").stat().st_size > 1000


# One row per code path of a run (each quick run compiles its programs: all 20 rows would take
# ~20 minutes); the other rows differ only in config overrides, checked by the test below.
QUICK_ROWS = ("sft", "opd-full-vocab", "omniopd-group", "omniopd-decision",
              "other-tokenizer-omniopd", "other-tokenizer-opd", "style-shift-opd-full-vocab",
              "style-shift-omniopd")  # fmt: skip


def test_every_variant_is_a_valid_config():
  from omniopd_jax.configs import validate

  base = compare.base_config(quick=True)
  for v in compare.VARIANTS:
    config = compare.run_config(base, v, lr=1e-4, seed=1, steps=4, student="s", teacher="t",
                                teacher_url="http://127.0.0.1:1/v1")  # fmt: skip
    assert config.method == v.method
    assert not validate.problems(config), v.name
    for field, _ in v.overrides:  # an existing key (run_config unlocks, so a typo would add one)
      node = base
      for part in field.split("."):
        assert part in node, (v.name, field)
        node = node[part]


def test_quick_compare_end_to_end(tmp_path, smoke_models):
  workdir, _, _ = smoke_models
  out = tmp_path / "cmp"
  compare.compare(str(out), quick=True, models=str(workdir / "models"), only=QUICK_ROWS)
  text = (out / "results.md").read_text()
  assert (out / "accuracy.png").stat().st_size > 1000
  rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
  assert set(rows) == set(QUICK_ROWS)
  for name in QUICK_ROWS:
    assert f"| {name} |" in text
  refused = rows["other-tokenizer-opd"]
  assert "tokenizer" in refused["error"] and "omniopd" in refused["error"]
  assert "refused" in text
  for name, row in rows.items():
    if name == "other-tokenizer-opd":
      continue
    assert "error" not in row, name
    assert 0.0 <= row["after_mean"] <= 1.0
    # Teachers were really used: OmniOPD through HTTP (continuation tokens), OPD in process.
    if row["method"] in ("omniopd", "opd"):
      assert row["teacher_tokens"] > 0, name
    else:
      assert row["teacher_tokens"] == 0, name
  assert list((out / "runs" / "omniopd-decision").glob("lr*/seed0/result.json"))
  # The style-shift rows ran against a shifted teacher trained once in the workdir, each at its
  # own learning rate (no sweep).
  from omniopd_jax.experiments import demo_models

  style_dir = out / "models" / "teacher_style_shift"
  assert json.loads((style_dir / demo_models.STYLE_FILE).read_text())["style"] == "shifted"
  for v in compare.VARIANTS:
    if v.style_shift and v.name in rows:
      assert rows[v.name]["lr"] == v.lr > 0 and rows[v.name]["group"] == "style", v.name
  assert (
    out / "serve_teacher_style_shift.log"
  ).exists()  # OmniOPD's HTTP teacher was the shifted one
  # A repeated command reuses finished runs instead of training again.
  (sft_result,) = (out / "runs" / "sft").glob("lr*/seed0/result.json")
  before = os.path.getmtime(sft_result)
  compare.compare(str(out), quick=True, models=str(workdir / "models"), only=("sft",))
  assert os.path.getmtime(sft_result) == before
