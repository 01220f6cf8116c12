"""The futures TeacherClient.submit returns: stock `concurrent.futures.Future`s (so that
`concurrent.futures.wait` / `as_completed` work), resolved from the client's event-loop thread."""

import concurrent.futures


def new_future() -> concurrent.futures.Future:
  return concurrent.futures.Future()


def resolve(future: concurrent.futures.Future, value) -> None:
  """Sets `value` once; a future the caller cancelled is marked so that waiters see it."""
  try:
    future.set_result(value)
  except concurrent.futures.InvalidStateError:
    if future.cancelled():
      future.set_running_or_notify_cancel()
