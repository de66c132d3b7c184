"""The credit ledger: seconds of service each adapter is owed (+) or owes (-).

Credit only moves between adapters, so the total stays what it was (zero from a fresh start):
- ``transfer``: when a step leaves out requests FCFS would have run, each displaced adapter gains
  the step's seconds and the adapters that took their place pay that total, in proportion.
- ``settle``: once an owed adapter has nothing left displaced, its balance is squared against
  the adapters in debt (each repaid in proportion to its debt, never past zero).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection

# The base model's key: base requests can be displaced like any adapter's.
BASE = ""


class CreditLedger:
    def __init__(self, balances: dict[str, float] | None = None) -> None:
        self.balances: defaultdict[str, float] = defaultdict(float, balances or {})

    def __getitem__(self, key: str) -> float:
        return self.balances.get(key, 0.0)

    def total(self) -> float:
        return sum(self.balances.values())

    def transfer(self, displaced: set[str], payers: dict[str, float], seconds: float) -> None:
        """Each key in ``displaced`` gains ``seconds``; ``payers`` (key -> weight > 0) pay the sum."""
        displaced = displaced - payers.keys()
        weight = sum(payers.values())
        if not displaced or weight <= 0 or seconds <= 0:
            return
        amount = seconds * len(displaced)
        for key in displaced:
            self.balances[key] += seconds
        for key, w in payers.items():
            self.balances[key] -= amount * w / weight

    def settle(self, key: str) -> None:
        """Square ``key``'s positive balance against the debtors."""
        owed = self.balances.get(key, 0.0)
        if owed <= 0:
            return
        debtors = {k: -v for k, v in self.balances.items() if v < 0 and k != key}
        debt = sum(debtors.values())
        if debt <= 0:
            return
        paid = min(owed, debt)
        for k, d in debtors.items():
            self.balances[k] += paid * d / debt
        self.balances[key] -= paid
        # Keep the ledger small: drop keys that are square.
        for k in [k for k, v in self.balances.items() if abs(v) < 1e-12]:
            del self.balances[k]

    def drop(self, keys: Collection[str], into: str | None = None) -> None:
        """Take ``keys`` out of the ledger (their adapter deleted: it will neither be served nor pay
        again; kept, its balance was saved with every checkpoint for good), the total kept: each
        balance goes to ``into`` (its adapter's version now); without it, a credit dropped forgives
        the debtors that much, a debt dropped cuts what the others are owed, each in proportion
        and never past zero."""
        for key in dict.fromkeys(keys):  # once each: a key named twice was popped twice (KeyError)
            if (gone := self.balances.pop(key, None)) is None:
                continue
            if into is not None:
                self.balances[into] += gone
                continue
            others = {k: v for k, v in self.balances.items() if v * gone < 0}
            weight = sum(abs(v) for v in others.values())
            if weight > 0:
                amount = math.copysign(min(abs(gone), weight), gone)
                for k, v in others.items():
                    self.balances[k] += amount * abs(v) / weight
        for k in [k for k, v in self.balances.items() if abs(v) < 1e-12]:
            del self.balances[k]
