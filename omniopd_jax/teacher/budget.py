"""The teacher's spending cap: every call reserves its worst-case cost before it is sent, so the
spend (settled from the usage each answer reports) never passes `budget_usd`."""

import asyncio


class Budget:
  """Spent and reserved USD against an optional cap (None: no cap). Event-loop thread only."""

  def __init__(self, limit_usd: float | None):
    self.limit_usd = None if limit_usd is None else float(limit_usd)
    self.spent_usd = 0.0
    self.reserved_usd = 0.0
    self._changed: asyncio.Condition | None = None  # created on the loop that uses it

  @property
  def capped(self) -> bool:
    return self.limit_usd is not None

  def exhausted_reason(self) -> str:
    return (
      f"budget cap reached: ${self.spent_usd:.4f} spent of budget_usd={self.limit_usd}; raise "
      "teacher.budget_usd to continue"
    )

  async def reserve(self, cost_usd: float, halted=lambda: False) -> bool:
    """Holds `cost_usd` for one call. Waits while other calls' reservations may still be freed;
    False once the cap would be passed with nothing else in flight (or once `halted()`)."""
    self._changed = self._changed or asyncio.Condition()
    async with self._changed:
      while self.spent_usd + self.reserved_usd + cost_usd > self.limit_usd:
        if self.reserved_usd <= 0 or halted():
          return False
        await self._changed.wait()
      self.reserved_usd += cost_usd
      return True

  async def release(self, cost_usd: float) -> None:
    """Frees a reservation (after the call's real cost was charged, or it failed)."""
    self._changed = self._changed or asyncio.Condition()
    async with self._changed:
      self.reserved_usd -= cost_usd
      self._changed.notify_all()

  def charge(self, cost_usd: float) -> None:
    self.spent_usd += cost_usd
