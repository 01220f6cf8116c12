"""Keeps credentials inside the process: every string the teacher client hands out (failure
reasons, halt causes, log records, sample texts) passes through a Redactor that knows the key and
every credential header value, since a gateway may echo them in an error body."""

import dataclasses
import logging
import threading

REDACTED = "[REDACTED]"
_MIN_SECRET_CHARS = 4  # shorter values would scrub ordinary words


class Redactor:
  """Replaces each secret (longest first, so "Bearer KEY" goes whole) with REDACTED."""

  def __init__(self, secrets):
    found = {s for s in secrets if isinstance(s, str) and len(s) >= _MIN_SECRET_CHARS}
    self.secrets = tuple(sorted(found, key=len, reverse=True))

  def __bool__(self) -> bool:
    return bool(self.secrets)

  def scrub(self, text):
    if not isinstance(text, str) or not self.secrets:
      return text
    for s in self.secrets:
      if s in text:
        text = text.replace(s, REDACTED)
    return text

  def scrub_sample(self, sample):
    """The sample with its text and error scrubbed (the same object when nothing matched)."""
    text, error = self.scrub(sample.text), self.scrub(sample.error)
    if text is sample.text and error is sample.error:
      return sample
    return dataclasses.replace(sample, text=text, error=error)


class RedactingFilter(logging.Filter):
  """A logging filter that scrubs the secrets of every live client from a record's message and
  traceback (installed on the teacher modules' loggers; records are formatted here, once)."""

  def __init__(self):
    super().__init__()
    self._redactors: list[Redactor] = []
    self._lock = threading.Lock()

  def add(self, redactor: Redactor) -> None:
    with self._lock:
      self._redactors.append(redactor)

  def remove(self, redactor: Redactor) -> None:
    with self._lock:
      if redactor in self._redactors:
        self._redactors.remove(redactor)

  def filter(self, record: logging.LogRecord) -> bool:
    redactors = self._redactors
    if not redactors:
      return True
    message = record.getMessage()
    for r in redactors:
      message = r.scrub(message)
    record.msg, record.args = message, None
    if record.exc_info:
      text = logging.Formatter().formatException(record.exc_info)
      for r in redactors:
        text = r.scrub(text)
      record.exc_info, record.exc_text = None, None
      record.msg = f"{record.msg}\n{text}"
    return True


LOG_FILTER = RedactingFilter()


def install(redactor: Redactor, logger_names) -> None:
  """Scrubs `redactor`'s secrets from the named loggers' records until `uninstall`."""
  if not redactor:
    return
  for name in logger_names:
    logger = logging.getLogger(name)
    if LOG_FILTER not in logger.filters:
      logger.addFilter(LOG_FILTER)
  LOG_FILTER.add(redactor)


def uninstall(redactor: Redactor) -> None:
  LOG_FILTER.remove(redactor)
