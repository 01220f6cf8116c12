"""Student chunk texts and teacher prefixes for the chosen forks (host side: numpy + a tokenizer).

Follows reference/teacher_apis.md §10: a text prefix never ends in whitespace (it moves to the
chunk side), and cut points whose text does not survive decoding are counted, not hidden.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass
class ForkRequests:
  """One teacher request per valid fork, with indices back into the [B, M] fork arrays.

  For a text teacher, `prefix_text` (prompt + response) or `response_prefix_text` (the assistant
  prefill, for chat APIs that add their own roles) is continued and scored against `chunk_text`.
  For a same-tokenizer teacher fed `prefix_ids`, the continuation starts after the moved whitespace:
  score it against `chunk_text_for_ids()`.
  """

  batch_shape: tuple[int, int]  # (B, M) of the fork arrays
  row: np.ndarray  # [n] int32 batch row of each request
  slot: np.ndarray  # [n] int32 fork slot in [0, M)
  start: np.ndarray  # [n] int32 fork position t among the generated tokens
  prefix_ids: list[np.ndarray]  # n x [P_b + t] int32: prompt ids + response ids[:t]
  prefix_text: list[str]  # decode(prompt) + response_prefix_text
  response_prefix_text: list[str]  # decode(response[:t]) without trailing whitespace
  chunk_text: list[str]  # moved whitespace + decode(response[t:t+C]): what follows prefix_text
  moved_whitespace: list[str]  # trailing whitespace taken off the prefix text, put on the chunk
  boundary_mismatch: np.ndarray  # [n] bool: the text cut at t is not clean (see _split_clean)

  def __len__(self) -> int:
    return len(self.row)

  def chunk_text_for_ids(self) -> list[str]:
    """Student chunk texts that continue `prefix_ids` exactly (no moved whitespace)."""
    return [c[len(w) :] for c, w in zip(self.chunk_text, self.moved_whitespace)]

  def scatter(self, values, fill_value=np.nan) -> np.ndarray:
    """Puts per-request values [n, ...] into a [B, M, ...] array, `fill_value` elsewhere."""
    values = np.asarray(values)
    if values.shape[:1] != (len(self),):
      raise ValueError(f"scatter: expected values of shape [{len(self)}, ...], got {values.shape}.")
    out_dtype = np.result_type(values.dtype, fill_value)  # a Python float fill keeps float32
    out = np.full(self.batch_shape + values.shape[1:], fill_value, dtype=out_dtype)
    out[self.row, self.slot] = values
    return out


def _prompt_lists(prompt_ids, prompt_mask, batch: int) -> list[list[int]]:
  """Ragged prompt token lists from a list of sequences or a padded [B, P] array + mask."""
  if prompt_mask is not None:
    ids, pmask = np.asarray(prompt_ids), np.asarray(prompt_mask, bool)
    if ids.shape != pmask.shape:
      raise ValueError(f"prompt_ids {ids.shape} and prompt_mask {pmask.shape} must match.")
    prompts = [ids[b][pmask[b]].tolist() for b in range(ids.shape[0])]
  else:
    prompts = [list(map(int, p)) for p in prompt_ids]
  if len(prompts) != batch:
    raise ValueError(f"got {len(prompts)} prompts for {batch} responses.")
  return prompts


def _common_prefix_len(a: str, b: str) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def _split_clean(pre: str, chunk: str, joint: str, full: str) -> tuple[str, str, bool]:
  """Cuts the chunk text out of `full` (the whole decoded response) at text-stable points.

  The fork cut is clean when decode(pre) + decode(chunk) == decode(pre + chunk) and the full
  response text starts with decode(pre). Otherwise (e.g. a UTF-8 character split across the fork
  decodes to U+FFFD) the cut backs off to the last character on which they agree, so the returned
  prefix + chunk is always a prefix of the real response text. Returns (prefix, chunk, mismatch).
  """
  mismatch = pre + chunk != joint or not full.startswith(pre)
  cut = _common_prefix_len(pre, full)
  end = max(_common_prefix_len(joint, full), cut)  # a character split at the chunk end drops out
  return full[:cut], full[cut:end], mismatch


def build_fork_requests(
  tokenizer,
  prompt_ids,
  response_ids,
  response_mask,
  starts,
  valid,
  *,
  chunk_len: int,
  prompt_mask=None,
) -> tuple[ForkRequests, int]:
  """Builds the teacher requests for every valid fork.

  Response texts are decoded with special tokens skipped (an EOS inside a chunk adds no text);
  the prompt keeps its chat-template markup (raw completions need it).

  Args:
    tokenizer: a transformers tokenizer (needs `batch_decode`).
    prompt_ids: B token sequences, or a padded [B, P] array with `prompt_mask`.
    response_ids: [B, L] generated token ids.
    response_mask: [B, L] bool, True up to and including EOS.
    starts, valid: [B, M] from forks.select_forks (numpy or jax arrays).
    chunk_len: C; every valid fork must have t + C <= response_mask[b].sum().
    prompt_mask: optional [B, P] bool, True on real prompt tokens.

  Returns:
    (requests, num_boundary_mismatches).
  """
  response_ids = np.asarray(response_ids)
  response_mask = np.asarray(response_mask, bool)
  starts, valid = np.asarray(starts), np.asarray(valid, bool)
  if response_ids.ndim != 2 or response_ids.shape != response_mask.shape:
    raise ValueError(
      f"response_ids {response_ids.shape} and response_mask {response_mask.shape} must both be [B, L]."
    )
  if starts.shape != valid.shape or starts.shape[0] != response_ids.shape[0]:
    raise ValueError(
      f"starts {starts.shape} and valid {valid.shape} must both be [B, M] with B = {response_ids.shape[0]}."
    )
  prompts = _prompt_lists(prompt_ids, prompt_mask, response_ids.shape[0])
  lengths = response_mask.sum(axis=1)  # [B]
  row, slot = np.nonzero(valid)  # row-major: requests ordered by (row, slot)
  t = starts[row, slot].astype(np.int64)  # [n]
  bad = (t < 0) | (t + chunk_len > lengths[row])
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(
      f"fork (row {row[i]}, slot {slot[i]}) starts at {t[i]}: a chunk of {chunk_len} does not fit a "
      f"response of {lengths[row[i]]} tokens. Use the same chunk_len and mask as select_forks."
    )
  resp = [response_ids[b].tolist() for b in row]
  pre = tokenizer.batch_decode([r[:s] for r, s in zip(resp, t)], skip_special_tokens=True)
  chunk = tokenizer.batch_decode(
    [r[s : s + chunk_len] for r, s in zip(resp, t)], skip_special_tokens=True
  )
  joint = tokenizer.batch_decode(
    [r[: s + chunk_len] for r, s in zip(resp, t)], skip_special_tokens=True
  )
  full = tokenizer.batch_decode(
    [r[:n] for r, n in zip(resp, lengths[row])], skip_special_tokens=True
  )
  prompt_text = tokenizer.batch_decode(prompts, skip_special_tokens=False)

  response_prefix, chunk_text, moved, mismatch = [], [], [], []
  for p, c, j, f in zip(pre, chunk, joint, full):
    p, c, bad_cut = _split_clean(p, c, j, f)
    stripped = p.rstrip()  # no trailing whitespace in a prefill (Anthropic rejects it)
    ws = p[len(stripped) :]
    response_prefix.append(stripped)
    chunk_text.append(ws + c)
    moved.append(ws)
    mismatch.append(bad_cut)
  requests = ForkRequests(
    batch_shape=(int(valid.shape[0]), int(valid.shape[1])),
    row=row.astype(np.int32),
    slot=slot.astype(np.int32),
    start=t.astype(np.int32),
    prefix_ids=[np.asarray(prompts[b] + r[:s], np.int32) for b, r, s in zip(row, resp, t)],
    prefix_text=[prompt_text[b] + p for b, p in zip(row, response_prefix)],
    response_prefix_text=response_prefix,
    chunk_text=chunk_text,
    moved_whitespace=moved,
    boundary_mismatch=np.asarray(mismatch, bool).reshape(-1),
  )
  return requests, int(requests.boundary_mismatch.sum())


def build_row_requests(
  tokenizer, prompt, response_ids, response_mask, starts, valid, *, row: int, num_rows: int,
  chunk_len: int,
) -> ForkRequests:  # fmt: skip
  """`build_fork_requests` for one row (response [L], forks [M]) of a [num_rows, ...] batch:
  the requests the whole-batch call makes for that row, with their row index and batch shape."""
  req, _ = build_fork_requests(
    tokenizer, [prompt], np.asarray(response_ids)[None], np.asarray(response_mask, bool)[None],
    np.asarray(starts)[None], np.asarray(valid, bool)[None], chunk_len=chunk_len,
  )  # fmt: skip
  req.row[:] = row
  req.batch_shape = (int(num_rows), req.batch_shape[1])
  return req


def join_requests(parts: list[ForkRequests], batch_shape: tuple[int, int]) -> ForkRequests:
  """Per-row ForkRequests (in row order) as one, as `build_fork_requests` on the whole batch."""
  cat = lambda name, dtype: np.concatenate(  # noqa: E731
    [getattr(p, name) for p in parts] or [np.zeros(0, dtype)]
  ).astype(dtype)
  flat = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
  return ForkRequests(
    batch_shape=tuple(batch_shape), row=cat("row", np.int32), slot=cat("slot", np.int32),
    start=cat("start", np.int32), prefix_ids=flat("prefix_ids"), prefix_text=flat("prefix_text"),
    response_prefix_text=flat("response_prefix_text"), chunk_text=flat("chunk_text"),
    moved_whitespace=flat("moved_whitespace"),
    boundary_mismatch=cat("boundary_mismatch", bool),
  )  # fmt: skip


def clip_to_tokens(tokenizer, texts, num_tokens: int) -> list:
  """Each text cut to its first `num_tokens` tokens of `tokenizer` (None stays None).

  Scoring compares like with like (reference/teacher_apis.md §10, step 4): the student's chunk
  and every teacher continuation are measured in the student's tokens from the same cut point.
  Without it, a fork right after a space compares the space plus C student tokens against C
  teacher tokens that include the space (one character longer on a character-level student:
  " 8\nAnswer" against " 8\nAnswe", which MiniLM scores 0.56 although both say 8).
  """
  present = [t for t in texts if t is not None]
  if not present:
    return list(texts)
  ids = tokenizer(present, add_special_tokens=False)["input_ids"]
  heads = tokenizer.batch_decode([x[:num_tokens] for x in ids], skip_special_tokens=True)
  # The original characters, up to where the round trip still agrees with them (a character
  # split by the cut decodes to U+FFFD and drops out, as in _split_clean).
  clipped = iter(t[: _common_prefix_len(t, h)] for t, h in zip(present, heads))
  return [None if t is None else next(clipped) for t in texts]
