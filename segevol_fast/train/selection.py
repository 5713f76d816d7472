"""Which validation was best, and when to stop: the best-checkpoint and early-stopping rule.

A validation improves on the best so far when its score exceeds it by more than `min_delta`
(higher is better: Dice); a nan score never improves. With `patience` > 0, training stops after
`patience` validations in a row without improvement. The state travels in checkpoints, so a
resumed run keeps its best score and its count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class BestTracker:
    patience: int = 0  # validations without improvement before stopping; 0: never stop early
    min_delta: float = 0.0
    best: float = -math.inf
    best_step: int | None = None
    since_best: int = 0  # validations since the best one

    def update(self, score: float, step: int) -> bool:
        """Record one validation's score; True when it is the new best."""
        if math.isfinite(score) and score > self.best + self.min_delta:
            self.best, self.best_step, self.since_best = float(score), int(step), 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in ("best", "best_step", "since_best")}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.since_best = float(state["best"]), state["best_step"], int(state["since_best"])
