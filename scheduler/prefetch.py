"""How much memory to map ahead for what the loop cannot foresee, learned online.

The background mapper (:meth:`scheduler.metered.MeteredArena.map_ahead`) maps what the
running requests will take in the next step exactly (:meth:`EngineLoop.next_step_blocks`);
what it cannot see is what arrives: admissions of new prompts, swap-ins, recomputes. A lease
raise past the mapped spare maps on the loop's thread (a miss). :class:`PrefetchLearner`
sizes the extra spare from the loop's own history instead of a constant tuned on one trace:
it keeps the last ``history`` steps in which more blocks were allocated than foreseen and
answers a high quantile of those surprises.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np


class PrefetchLearner:
    """The ``quantile`` of the last ``history`` nonzero per-step surprises, in blocks.

    Args:
        quantile: in [0, 1]; 0 keeps nothing ahead beyond the exact lookahead (every
            admission maps on the loop's thread), 1 keeps the largest recent surprise.
        history: how many surprising steps are remembered (>= 1).
    """

    def __init__(self, quantile: float = 0.9, history: int = 64) -> None:
        if not (isinstance(quantile, (int, float)) and 0 <= quantile <= 1):
            raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a positive int, got {history!r}")
        self.quantile = float(quantile)
        self._seen: deque[int] = deque(maxlen=history)
        self._allowance = 0

    def observe(self, surprise_blocks: int) -> None:
        """Blocks allocated in a step beyond what was foreseen (<= 0: none; ignored)."""
        if surprise_blocks > 0:
            self._seen.append(int(surprise_blocks))
            q = self.quantile
            self._allowance = 0 if q == 0 else int(math.ceil(
                np.quantile(np.fromiter(self._seen, dtype=np.int64), q, method="higher")))

    def allowance(self) -> int:
        """Blocks to keep mapped ahead for the unforeseen (0 until a surprise was seen)."""
        return self._allowance
