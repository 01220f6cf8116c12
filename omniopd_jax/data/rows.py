"""Row checks: every problem is validated when its source is loaded, before any training.

A usable row has a non-empty string question and a non-empty answer (a string, or a number that
becomes one), each at most `data.max_chars` characters. A bad row is an error naming where it is
(file and line, or row index for generated and TFDS data), or, with `data.skip_bad_rows`, it is
left out, counted and reported once.
"""

import json
import logging
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)


class BadRowError(ValueError):
  """A row that cannot be trained on; the message says what is wrong, not where."""


def _kind(value) -> str:
  return "null" if value is None else type(value).__name__


def text_field(row: Mapping, field: str, what: str, *, max_chars: int, numbers_ok: bool) -> str:
  """row[field] as text, or BadRowError. `what` is "question" or "answer" (for the message).

  Missing and null are told apart (a null value is a bad row, a missing key often a wrong
  data.question_field / data.answer_field); dicts, lists and booleans are never text; numbers are
  accepted only where `numbers_ok` (gold answers such as 42).
  """
  if field not in row:
    raise BadRowError(
      f"missing field {field!r} (has {sorted(row)}); set data.question_field / "
      "data.answer_field to the file's names"
    )
  value = row[field]
  if isinstance(value, bytes):  # TFDS text features
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRowError(f"{what} (field {field!r}) is not valid UTF-8 ({e})") from e
  if value is None:
    raise BadRowError(f"null/empty {what}: field {field!r} is null")
  if isinstance(value, numbers.Number) and not isinstance(value, bool) and numbers_ok:
    value = str(value)
  if not isinstance(value, str):
    allowed = "a string or a number" if numbers_ok else "a string"
    raise BadRowError(f"{what} (field {field!r}) is {_kind(value)} {value!r:.60}, not {allowed}")
  if not value.strip():
    raise BadRowError(f"null/empty {what}: field {field!r} is {value!r:.20} (empty or whitespace)")
  if max_chars and len(value) > max_chars:
    raise BadRowError(
      f"{what} (field {field!r}) has {len(value)} characters, more than data.max_chars="
      f"{max_chars} (raise it, or 0 for no limit)"
    )
  return value


class CheckedRows(Sequence):
  """The usable rows of a random-access source, by index; bad ones are left out (and counted)."""

  def __init__(self, rows: Sequence, keep: list[int] | None, skipped: list[str]):
    self._rows = rows
    self._keep = keep  # None: every row is usable (no index list kept)
    self.skipped = skipped  # "where: problem" of each row left out

  def __len__(self) -> int:
    return len(self._rows) if self._keep is None else len(self._keep)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    n = len(self)
    if not -n <= i < n:  # iteration stops here: some sources (reasoning-gym) never raise it
      raise IndexError(f"row {i} of {n}")
    i %= n
    return self._rows[i if self._keep is None else self._keep[i]]


def check_rows(
  rows: Sequence,
  convert: Callable[[Any], Any],
  where: Callable[[int], str],
  *,
  skip: bool,
  name: str,
) -> CheckedRows:
  """Run `convert` (which raises BadRowError) over every row once; keep the usable ones.

  `where(i)` names row i ("train.jsonl line 3", "TFDS gsm8k[train] row 7"); `name` names the whole
  source in the summary. Without `skip`, the first bad row is a ValueError; with it, bad rows are
  left out and reported once. No usable row at all is always an error.
  """
  keep, skipped = [], []
  for i in range(len(rows)):
    try:
      convert(rows[i])
    except BadRowError as e:
      if not skip:
        raise ValueError(
          f"{where(i)}: {e}; fix the row, or set data.skip_bad_rows=True to skip and count such rows"
        ) from None
      skipped.append(f"{where(i)}: {e}")
    else:
      keep.append(i)
  if not keep:
    first = f"; the first: {skipped[0]}" if skipped else ""
    raise ValueError(f"{name}: no usable problems ({len(skipped)} bad rows{first})")
  if skipped:
    logger.warning(
      "%s: skipped %d bad rows of %d (data.skip_bad_rows=True); the first: %s",
      name, len(skipped), len(rows), skipped[0],
    )  # fmt: skip
  return CheckedRows(rows, None if not skipped else keep, skipped)


def file_rows(path: str) -> list[tuple[str, dict]]:
  """(location, row) pairs of a JSONL or Parquet file, location like 'file.jsonl line 3'."""
  if not path:
    raise ValueError("data.train_path is empty: give a .jsonl or .parquet file of problems")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such data file (check data.train_path / data.eval_path)")
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq

    try:
      rows = pq.read_table(path).to_pylist()
    except Exception as e:
      raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
    return [(f"{path} row {i}", row) for i, row in enumerate(rows)]
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a readable UTF-8 JSONL file ({e})") from e
  out = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} line {lineno}: not valid JSON ({e.msg}); one object a line") from e
    if not isinstance(row, dict):
      raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
    out.append((f"{path} line {lineno}", row))
  return out
