"""Flax sentence encoder (encoder.py, bert.py) against sentence-transformers as the reference."""

import json
import os
import random
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from sentence_transformers import SentenceTransformer

from omniopd_jax import sharding
from omniopd_jax.models import bert
from omniopd_jax.reward import encoder


def math_chunk(rng: random.Random, parts=(1, 9)) -> str:
  out = []
  for _ in range(rng.randint(*parts)):
    a, b = rng.randint(0, 999), rng.randint(1, 99)
    out.append(
      rng.choice(
        [
          f"so {a} + {b} = {a + b}",
          f"then {a} * {b} = {a * b}, and we carry the {b % 10}",
          f"$\\frac{{{a}}}{{{b}}} \\approx {a / b:.3f}$",
          f"Let x = {a}. Then 2x - {b} = {2 * a - b}",
          f"{a} mod {b} is {a % b}, so the remainder is {a % b}",
          f"the answer is \\boxed{{{a - b}}}",
        ]
      )
    )
  return ", ".join(out) + rng.choice(["", ".", " ", "\n"])


def varied_texts() -> list[str]:
  rng = random.Random(1234)
  texts = [math_chunk(rng) for _ in range(200)]
  texts += ["", " ", "\n\t ", ".", "a", "42", "The answer is 42."]
  texts += [
    "É café naïve coöperate Ångström",
    "日本語のテキストと数学: x² + y² = z²",
    "Ελληνικά: ∑_{i=1}^n i = n(n+1)/2, ∫ f(x) dx, √2 ≈ 1.414",
    "emoji 🙂🚀🔥 and zero\u200bwidth and combining e\u0301",
    "العربية: ٣ + ٤ = ٧",
    "def f(x):\n    return x ** 2  # code chunk",
    "ALL CAPS SHOUTING ABOUT 7 × 8 = 56!!!",
  ]
  # Long texts that the max sequence length truncates (256 tokens for MiniLM).
  texts += [" ".join(math_chunk(rng) for _ in range(30)) for _ in range(6)]
  texts += ["word " * 600, "∞" * 400, "1 + " * 300 + "1"]
  texts += texts[:5]  # duplicates
  return texts


def cosine_rows(a, b):
  return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def minilm():
  return encoder.load_encoder()


@pytest.fixture(scope="module")
def reference():
  return SentenceTransformer(encoder.default_model_path(), device="cpu")


@pytest.fixture(scope="module")
def texts():
  return varied_texts()


@pytest.fixture(scope="module")
def reference_embeddings(reference, texts):
  return reference.encode(texts, batch_size=64, convert_to_numpy=True)


def test_tokenizer_matches_sentence_transformers(minilm, reference, texts):
  ours = minilm.tokenize(texts)
  ref = reference.preprocess(texts)
  assert max(len(t) for t in ours) == minilm.cfg.max_seq_length == 256
  for i, ids in enumerate(ours):
    n = int(ref["attention_mask"][i].sum())
    assert ids == ref["input_ids"][i][:n].tolist(), texts[i]


def test_encode_matches_sentence_transformers(minilm, reference_embeddings, texts):
  ours = minilm.encode(texts)
  ref = reference_embeddings
  assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
  cos = cosine_rows(ours, ref)
  worst = int(np.argmin(cos))
  assert cos.min() >= 0.99999, (cos.min(), texts[worst])
  # Packing must not make a text depend on its neighbours: alone it embeds the same.
  alone = minilm.encode([texts[worst], texts[-1]])
  np.testing.assert_allclose(alone[0], ours[worst], atol=2e-6)


def test_step_similarity_matches_reference(minilm, reference_embeddings, texts):
  rng = np.random.default_rng(0)
  n, width = 24, 6
  s_idx = rng.integers(0, len(texts), n)
  t_idx = rng.integers(0, len(texts), (n, width))
  student = [texts[i] for i in s_idx]
  teacher = [[texts[i] for i in row] for row in t_idx]
  teacher[0][0] = student[0]  # identical texts -> 1
  t_idx[0, 0] = s_idx[0]
  teacher[1] = [None] * width  # every teacher sample failed
  teacher[2][3] = None
  teacher[3][1] = " \n"  # blank text is a failed sample too (SPEC 1.5)
  scorer = encoder.FlaxEmbeddingScorer(encoder=minilm)
  sims = scorer.score(student, teacher)

  ref = reference_embeddings / np.linalg.norm(reference_embeddings, axis=1, keepdims=True)
  expected = np.clip(np.einsum("nd,nkd->nk", ref[s_idx], ref[t_idx]), 0.0, 1.0)
  for i, row in enumerate(teacher):
    expected[i, [j for j, t in enumerate(row) if t is None or not t.strip()]] = np.nan
  assert sims.shape == (n, width) and sims.dtype == np.float32
  np.testing.assert_array_equal(np.isnan(sims), np.isnan(expected))
  np.testing.assert_allclose(sims, expected, atol=1e-5)
  assert abs(sims[0, 0] - 1.0) < 1e-6
  assert np.all(np.isnan(sims[1])) and np.isnan(sims[2, 3]) and np.isnan(sims[3, 1])
  assert np.isnan(expected).sum() >= width + 2  # the pool also holds blank texts


def test_steps_of_similar_size_do_not_recompile(minilm):
  rng = random.Random(7)

  def step():
    student = [math_chunk(rng, (3, 5)) for _ in range(16)]  # about 50 tokens, like real chunks
    return student, [[math_chunk(rng, (3, 5)) for _ in range(3)] for _ in student]

  minilm.score(*step())
  compiled = minilm._score_fn._cache_size()
  for _ in range(2):
    sims = minilm.score(*step())
    assert sims.shape == (16, 3) and np.all((sims >= 0) & (sims <= 1))
  assert minilm._score_fn._cache_size() == compiled


def test_short_row_adapts_to_the_texts_then_stays(minilm):
  enc = encoder.Encoder(nnx.merge(minilm.graphdef, minilm.state), minilm.tokenizer)
  assert enc.pack([[101, 102]] * 3).groups[0][0].shape[-1] == 32  # empty strings: short rows
  assert enc.short_row is None  # chosen from 3 texts: used once, not kept
  enc.pack([[101, 102]] * 64)
  assert enc.short_row == 32
  rng = np.random.default_rng(0)
  chunks = [[101] + [2000] * int(n) + [102] for n in rng.integers(48, 60, 200)]
  packed = enc.pack(chunks)
  chosen = enc.short_row
  assert 96 <= chosen <= 128 and len(packed.groups) == 1  # two ~55-token texts per row
  segments = packed.groups[0][2].reshape(-1, chosen)
  used_rows = segments[(segments >= 0).any(axis=1)]
  assert (used_rows >= 0).mean() > 0.9  # tightly packed (all-padding blocks are skipped)
  enc.pack(chunks[:150] + [[101] + [2000] * 200 + [102]])  # similar median: the choice stays
  assert enc.short_row == chosen
  fixed = encoder.Encoder(nnx.merge(minilm.graphdef, minilm.state), minilm.tokenizer, short_row=64)
  fixed.pack(chunks)
  assert fixed.short_row == 64


def test_empty_inputs(minilm):
  assert minilm.encode([]).shape == (0, 384)
  assert minilm.score([], []).shape == (0, 0)
  assert np.isnan(minilm.score(["a"], [[None, None]])).all()
  assert np.isnan(minilm.score(["a", "b"], [["", "  "], [None, "\t"]])).all()


@pytest.mark.parametrize("row_len", [32, 128])
def test_pack_rows_is_a_valid_tight_packing(row_len):
  rng = np.random.default_rng(row_len)
  lengths = rng.integers(2, row_len + 1, 500)
  lengths[:40] = 2  # empty strings: [CLS] [SEP]
  row, start, slot = encoder.pack_rows(lengths, row_len, max_per_row=8)
  occupied = np.zeros((row.max() + 1, row_len), int)
  for r, s, n in zip(row, start, lengths):
    assert s + n <= row_len
    occupied[r, s : s + n] += 1
  assert occupied.max() == 1  # no two texts overlap
  for r in range(row.max() + 1):
    slots = np.sort(slot[row == r])
    np.testing.assert_array_equal(slots, np.arange(slots.size))  # slots 0..k-1, at most 8
    assert slots.size <= 8
  lower_bound = -(-lengths.sum() // row_len)
  assert row.max() + 1 <= 1.1 * lower_bound + 1
  with pytest.raises(ValueError, match="does not fit"):
    encoder.pack_rows([row_len + 1], row_len, 8)


def test_parameters_carry_logical_axes(minilm):
  model = nnx.merge(minilm.graphdef, minilm.state)
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert len(params) == 6 * 12 + 5
  for path, var in params:
    axes = var.get_metadata()["logical_axes"]
    assert len(axes) == var.value.ndim, path
  assert model.word_embeddings.get_metadata()["logical_axes"] == ("vocab", "embed")


# ------------------------------------------------------------------------------------------------
# A tiny random BERT saved as a sentence-transformers directory: other pooling modes, no Normalize,
# a short max_seq_length, the tanh GELU; and sharded execution on the 8 fake devices.

POOLING = ["cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken", "mean"]


def write_tiny_model(path, modules=None):
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  torch.manual_seed(0)
  cfg = transformers.BertConfig(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_act="gelu_new",
    initializer_range=0.3,
  )
  transformers.BertModel(cfg).eval().save_pretrained(path)
  src = encoder.default_model_path()
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(os.path.join(src, name), path)
  with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": 24, "do_lower_case": False}, f)
  os.makedirs(os.path.join(path, "1_Pooling"))
  with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
    json.dump({"embedding_dimension": 32, "pooling_mode": POOLING, "include_prompt": True}, f)
  modules = modules or [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
  ]
  with open(os.path.join(path, "modules.json"), "w") as f:
    json.dump(modules, f)
  return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return write_tiny_model(tmp_path_factory.mktemp("tiny_st"))


def test_tiny_model_pooling_modes_match_sentence_transformers(tiny_dir, texts):
  ours = encoder.load_encoder(tiny_dir)
  assert ours.cfg.pooling_modes == tuple(POOLING) and not ours.cfg.normalize
  assert ours.cfg.max_seq_length == 24 and ours.cfg.hidden_act == "gelu_new"
  subset = texts[:60] + texts[-12:]
  got = ours.encode(subset)
  ref = SentenceTransformer(tiny_dir, device="cpu").encode(subset, convert_to_numpy=True)
  assert got.shape == ref.shape == (len(subset), 32 * len(POOLING))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  assert cosine_rows(got, ref).min() >= 0.99999


def test_sharded_scores_match_unsharded(tiny_dir, texts):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  plain = encoder.load_encoder(tiny_dir)
  sharded = encoder.load_encoder(tiny_dir, mesh=mesh, rules=sharding.DEFAULT_RULES)
  qkv = sharded.state["layers"][0]["qkv"]["kernel"].value
  assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
  student = texts[:16]
  teacher = [texts[16 + 3 * i : 19 + 3 * i] for i in range(16)]
  teacher[5][1] = None
  np.testing.assert_allclose(
    sharded.score(student, teacher), plain.score(student, teacher), atol=1e-5
  )
  batch_only = encoder.load_encoder(tiny_dir, mesh=mesh, batch_axes=("data",))
  np.testing.assert_allclose(
    batch_only.encode(texts[:8]), plain.encode(texts[:8]), rtol=1e-5, atol=1e-5
  )


def test_unsupported_directories_and_inputs_fail_clearly(tmp_path, minilm):
  modules = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
  ]
  path = write_tiny_model(tmp_path / "dense", modules)
  with pytest.raises(ValueError, match="Normalize only"):
    bert.read_config(path)
  with pytest.raises(FileNotFoundError, match="modules.json"):
    bert.read_config(str(tmp_path))
  with pytest.raises(TypeError, match="not one str"):
    minilm.encode("a single text")
  with pytest.raises(TypeError, match="must be str"):
    minilm.encode(["ok", None])
  with pytest.raises(ValueError, match="rows of teacher chunks"):
    minilm.score(["a", "b"], [["c"]])
  with pytest.raises(ValueError, match="same N"):
    minilm.score(["a", "b"], [["c"], ["d", "e"]])
