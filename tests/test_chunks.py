"""Tests for omniopd_jax.chunks with a byte-level BPE trained in-process (no downloads)."""

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from omniopd_jax.rollout import chunks

CORPUS = [
  "Let x = 5. Then 2x = 10.\n\nSo the answer is 10.",
  "Café ∑ naïve 😀 done. We add 3 + 4 = 7, then multiply: 7 * 6 = 42.",
  "<|user|> What is 6 * 7? Think step by step.\n",
]


@pytest.fixture(scope="module")
def tokenizer():
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<|eos|>", "<|user|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(CORPUS * 20, trainer)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


def _encode(tokenizer, text):
  return tokenizer.encode(text, add_special_tokens=False)


def _batch(tokenizer, texts, length):
  """[B, L] response ids (EOS appended, then padded with 0) and the mask up to EOS."""
  eos = tokenizer.eos_token_id
  ids = np.zeros((len(texts), length), np.int32)
  mask = np.zeros((len(texts), length), bool)
  for b, text in enumerate(texts):
    row = (_encode(tokenizer, text) + [eos])[:length]
    ids[b, : len(row)] = row
    mask[b, : len(row)] = True
  return ids, mask


def test_prefix_ids_texts_and_scatter(tokenizer):
  prompts = [_encode(tokenizer, "<|user|> What is 6 * 7?\n"), _encode(tokenizer, "<|user|> Add.\n")]
  ids, mask = _batch(tokenizer, ["We add 3 + 4 = 7, then", "So the answer is 10."], 16)
  starts = np.array([[3, 0], [1, 5]], np.int32)
  valid = np.array([[True, False], [True, True]])
  req, mismatches = chunks.build_fork_requests(
    tokenizer, prompts, ids, mask, starts, valid, chunk_len=2
  )
  assert mismatches == 0 and len(req) == 3
  assert (
    req.row.tolist() == [0, 1, 1]
    and req.slot.tolist() == [0, 0, 1]
    and req.start.tolist() == [3, 1, 5]
  )
  for i, (b, t) in enumerate(zip(req.row, req.start)):
    resp = ids[b].tolist()
    assert req.prefix_ids[i].tolist() == prompts[b] + resp[:t]
    assert req.chunk_text[i] == tokenizer.decode(resp[t : t + 2])  # these cuts have no whitespace
    assert req.response_prefix_text[i] == tokenizer.decode(resp[:t])
    assert req.prefix_text[i] == tokenizer.decode(prompts[b]) + tokenizer.decode(resp[:t])
  assert req.prefix_text[0].startswith("<|user|>")  # prompt markup kept for raw completions
  out = req.scatter(np.array([0.5, 0.25, 1.0], np.float32))
  assert out.shape == (2, 2) and out.dtype == np.float32
  np.testing.assert_array_equal(out, [[0.5, np.nan], [0.25, 1.0]])
  counts = req.scatter(np.ones((3, 4)), fill_value=0.0)
  assert counts.shape == (2, 2, 4) and counts.sum() == 12
  # Padded prompt array + mask gives the same requests.
  padded = np.zeros((2, 12), np.int32)
  pmask = np.zeros((2, 12), bool)
  for b, p in enumerate(prompts):
    padded[b, 12 - len(p) :], pmask[b, 12 - len(p) :] = p, True  # left padding
  req2, _ = chunks.build_fork_requests(
    tokenizer, padded, ids, mask, starts, valid, chunk_len=2, prompt_mask=pmask
  )
  assert [p.tolist() for p in req2.prefix_ids] == [p.tolist() for p in req.prefix_ids]
  assert req2.prefix_text == req.prefix_text


def test_trailing_whitespace_moves_to_the_chunk(tokenizer):
  text = "Let x = 5.\n\nSo the answer"
  ids, mask = _batch(tokenizer, [text], 20)
  resp = ids[0].tolist()
  # Fork right after the blank line: the decoded prefix ends in whitespace.
  cut = next(t for t in range(1, int(mask.sum())) if tokenizer.decode(resp[:t]).endswith("\n"))
  req, mismatches = chunks.build_fork_requests(
    tokenizer, [[]], ids, mask, np.array([[cut]]), np.array([[True]]), chunk_len=3
  )
  assert mismatches == 0
  decoded_prefix = tokenizer.decode(resp[:cut])
  assert (
    req.response_prefix_text[0] == decoded_prefix.rstrip()
    and decoded_prefix != decoded_prefix.rstrip()
  )
  assert req.moved_whitespace[0] == decoded_prefix[len(decoded_prefix.rstrip()) :]
  assert req.chunk_text[0] == req.moved_whitespace[0] + tokenizer.decode(resp[cut : cut + 3])
  assert req.chunk_text_for_ids() == [tokenizer.decode(resp[cut : cut + 3])]
  assert req.prefix_ids[0].tolist() == resp[:cut]  # token ids are never altered


def test_split_character_is_counted_and_repaired(tokenizer):
  text = "Café ∑ naïve 😀 done."
  ids, mask = _batch(tokenizer, [text], 30)
  resp = ids[0].tolist()
  n = int(mask.sum())
  full = tokenizer.decode(resp[:n], skip_special_tokens=True)
  bad_cuts = [
    t
    for t in range(1, n - 2)
    if tokenizer.decode(resp[:t]) + tokenizer.decode(resp[t : t + 2])
    != tokenizer.decode(resp[: t + 2])
    or not full.startswith(tokenizer.decode(resp[:t]))
  ]
  assert bad_cuts, "the test tokenizer should split a multi-byte character"
  starts = np.arange(n - 2, dtype=np.int32)[None, :]
  req, mismatches = chunks.build_fork_requests(
    tokenizer, [[]], ids, mask, starts, np.ones_like(starts, bool), chunk_len=2
  )
  assert mismatches == len(bad_cuts)
  assert req.start[req.boundary_mismatch].tolist() == bad_cuts
  for i in range(len(req)):
    assert full.startswith(req.response_prefix_text[i] + req.chunk_text[i])  # always real text
    assert "\ufffd" not in req.response_prefix_text[i] + req.chunk_text[i]
    assert req.response_prefix_text[i] == req.response_prefix_text[i].rstrip()


def test_random_forks_invariants(tokenizer):
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(" ".join(CORPUS).split(" "), size=12)) for _ in range(40)]
  ids, mask = _batch(tokenizer, texts, 64)
  lengths = mask.sum(1)
  starts = np.stack([rng.integers(0, np.maximum(lengths - 3, 1)) for _ in range(3)], 1).astype(
    np.int32
  )
  valid = (starts + 4 <= lengths[:, None]) & (rng.random(starts.shape) < 0.8)
  req, mismatches = chunks.build_fork_requests(
    tokenizer, [[1]] * 40, ids, mask, starts, valid, chunk_len=4
  )
  expected = 0
  for i, (b, t) in enumerate(zip(req.row, req.start)):
    r = ids[b].tolist()
    pre, chunk, joint, full = (
      tokenizer.decode(x, skip_special_tokens=True)
      for x in (r[:t], r[t : t + 4], r[: t + 4], r[: lengths[b]])
    )
    clean = pre + chunk == joint and full.startswith(pre)
    expected += not clean
    assert req.boundary_mismatch[i] == (not clean)
    if clean and "\ufffd" not in joint:
      assert req.response_prefix_text[i] + req.chunk_text[i] == joint
    assert full.startswith(req.response_prefix_text[i] + req.chunk_text[i])
    assert "<|eos|>" not in req.chunk_text[i]
  assert len(req) == int(valid.sum()) and mismatches == expected
  assert 0 < mismatches < len(req)  # the corpus has split characters and clean cuts
  assert any(req.moved_whitespace)


def test_rejects_chunks_that_do_not_fit(tokenizer):
  ids, mask = _batch(tokenizer, ["So the answer"], 10)
  n = int(mask.sum())
  with pytest.raises(ValueError, match="does not fit"):
    chunks.build_fork_requests(
      tokenizer, [[]], ids, mask, np.array([[n - 1]]), np.array([[True]]), chunk_len=2
    )
  with pytest.raises(ValueError, match="prompts"):
    chunks.build_fork_requests(
      tokenizer, [[], []], ids, mask, np.array([[0]]), np.array([[True]]), chunk_len=2
    )


def test_clip_to_tokens_compares_like_with_like():
  """A fork after a space: the student's chunk (space moved onto it, then C tokens) and a teacher
  continuation (C tokens that include the space) are both cut to C student tokens."""
  from omniopd_jax.data import tasks

  char = tasks.make_char_tokenizer()
  resp = char.encode("12 - 4 = 8\nAnswer: 8", add_special_tokens=False)
  t = len("12 - 4 = ")
  req, _ = chunks.build_fork_requests(
    char, [[1]], np.asarray([resp]), np.ones((1, len(resp)), bool), np.asarray([[t]]),
    np.asarray([[True]]), chunk_len=8,
  )  # fmt: skip
  assert req.response_prefix_text == ["12 - 4 ="] and req.chunk_text == [" 8\nAnswer"]  # 9 chars
  teacher = [
    " 8\nAnswe",
    None,
    " 9",
  ]  # C = 8 teacher tokens (the space is one), a failure, a short one
  assert chunks.clip_to_tokens(char, req.chunk_text, 8) == [" 8\nAnswe"]
  assert chunks.clip_to_tokens(char, teacher, 8) == teacher
  assert chunks.clip_to_tokens(char, [None], 8) == [None]


def test_clip_to_tokens_keeps_the_original_characters(tokenizer):
  text = "Café ∑ naïve 😀 done. We add 3 + 4 = 7"
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  for n in (1, 3, len(ids), len(ids) + 5):
    (clipped,) = chunks.clip_to_tokens(tokenizer, [text], n)
    assert text.startswith(clipped)
    assert len(tokenizer(clipped, add_special_tokens=False)["input_ids"]) == min(n, len(ids))
