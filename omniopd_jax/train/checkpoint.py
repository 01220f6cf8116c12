"""Orbax checkpoints of the train state plus a JSON sidecar (data position, teacher counters, RNG).

Resume order (first that applies):
  1. the latest complete checkpoint under <workdir>/checkpoints restores state + meta exactly;
  2. otherwise training starts from `config.model.student_path` (also the frozen KL base).
Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint
half-written at a crash or SIGKILL is never picked up.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves {state, meta} every `every` steps (and when forced), async, keeping the last `keep`."""

  def __init__(self, workdir: str, *, every: int, keep: int = 3, use_async: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.every = every
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=use_async
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "meta")
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """(state, meta) of `step` (default: latest). `abstract_state` carries target shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
    # Leaves without a sharding (e.g. tools.export on one host) land on one local device, so a
    # checkpoint written on any topology can be read back anywhere.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None) or local
      ),
      abstract_state,
    )
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
    return restored["state"], dict(restored["meta"])

  def maybe_save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Save when `step` is a multiple of `every` (or `force`); returns whether it saved."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self.manager.all_steps():
      return False
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )
    return True

  def wait(self):
    """Block until async saves are on disk (call before exiting)."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
