"""The boundary between the loop and its memory policies.

A memory policy (:mod:`scheduler.memory`) sees two things: the
:class:`~scheduler.metered.MeteredArena` (memory, charged) and a :class:`QueueView` (the
loop's queues, read-only). Before each step it returns a :class:`Decision`, plain data
that the loop carries out in a fixed order; it never changes request state or the queues.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .request import RequestSet


@dataclass(frozen=True)
class Decision:
    """What a memory policy wants done before a step. The loop carries it out in this
    order:

    1. ``preempt``: ``(req_id, swap)`` pairs, in order (swap: True = KV to host memory,
       False = dropped and recomputed);
    2. ``targets``: ``(prefill, decode)`` lease targets in blocks (None: leases unchanged);
       a lease never drops below what its pool holds; ``budgets``: ``(prefill, decode)``
       lease budgets in blocks (None: none): a lease above its budget drops to it (never
       below what its pool holds), nothing is raised or mapped; the policy grows leases
       within its budgets as blocks are needed;
    3. ``shrink``: compact and unmap, keeping ``keep_blocks`` mapped-unleased blocks;
    4. admission from the head of the waiting queue: with ``fcfs`` as many as running
       slots, the prefill token budget and free memory less ``watermark_blocks`` allow
       (stopping at the first that does not fit); otherwise up to ``admit`` requests
       (already checked by the policy). A request whose memory is not there stops it.

    ``window_end``: this decision starts a new window (counted, sampled); ``plan``: the
    planner's :class:`~scheduler.planner.Plan` behind it, if any (counted).
    """

    preempt: tuple[tuple[int, bool], ...] = ()
    targets: tuple[int, int] | None = None
    budgets: tuple[int, int] | None = None
    shrink: bool = False
    keep_blocks: int = 0
    admit: int = 0
    fcfs: bool = False
    watermark_blocks: int = 0
    window_end: bool = False
    plan: Any = None

    @classmethod
    def first_come_first_served(cls, watermark_blocks: int = 0) -> "Decision":
        """Admit from the head while memory (less a watermark) allows; nothing else."""
        return cls(fcfs=True, watermark_blocks=int(watermark_blocks))


class QueueView(Protocol):
    """The loop's queues as a policy may see them (read-only).

    Times in seconds on the loop's clock; token and request counts are ints.
    """

    @property
    def now(self) -> float:
        """The loop's clock."""

    @property
    def num_prefill(self) -> int:
        """Requests prefilling."""

    @property
    def num_decode(self) -> int:
        """Requests decoding."""

    @property
    def num_waiting(self) -> int:
        """Requests in the admission queue (swapped ones included)."""

    @property
    def max_running(self) -> int:
        """Sequences that may run at once."""

    @property
    def max_prefill_tokens(self) -> int:
        """Prompt tokens the prefill batch in flight may hold."""

    @property
    def next_arrival_s(self) -> float:
        """When the next submitted request arrives (inf: none left)."""

    @property
    def changed(self) -> bool:
        """Whether anything that may allow an admission happened since the last decision
        was carried out (an arrival, a finish, a preemption, prompt progress)."""

    @property
    def prompt_tokens_processed(self) -> int:
        """Prompt tokens prefilled so far in the run."""

    @property
    def preemptions(self) -> int:
        """Preemptions so far in the run."""

    def prefill_tokens_left(self) -> int:
        """Prompt tokens the prefill set has still to process."""

    def next_step_blocks(self) -> int:
        """Blocks the running requests of the batch in flight will allocate in the next
        step (no admission, no preemption): decode rows whose next token opens a block and
        the next prompt chunks."""

    def prefill_set(self) -> RequestSet:
        """The prefill set as arrays, in admission order."""

    def decode_set(self) -> RequestSet:
        """The decode set as arrays."""

    def waiting_set(self, n: int) -> RequestSet:
        """The first ``n`` requests of the admission queue as arrays."""
