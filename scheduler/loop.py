"""The engine loop: two queues, admission, batches, hand-off, and memory by policy.

:class:`EngineLoop` owns the prefill and decode queues of one :class:`arena.PagedArena`:

* requests are submitted with an arrival time and arrive on the loop's clock;
* each step forms a batch under a token budget — every decode request one token (oldest
  admission first), then prompt chunks (chunked prefill) with what is left — hands it to
  the model step callable as a :class:`Batch`, and advances the clock by the duration it
  returns plus the cost of the arena operations made on the way (:mod:`scheduler.costs`);
* a request whose prompt is done produces its first token and moves to the decode pool by
  ``Pool.transfer`` (no byte copied); it finishes after ``min(output_tokens, max_tokens)``
  output tokens;
* memory follows one of three policies (:mod:`scheduler.memory`): ``static``, ``on-demand``
  or ``windowed`` (the window planner, :mod:`scheduler.planner`). A policy changes memory
  only through the loop's :class:`~scheduler.metered.MeteredArena` (where every arena
  operation is charged to the clock) and reads the queues through a read-only view; what
  it wants done to requests it returns as a :class:`~scheduler.decision.Decision`, which
  the loop carries out (:meth:`EngineLoop.carry_out`);
* a request that needs a block its pool's lease does not cover gets it by growing the lease
  or, failing that, by preempting requests (victim policy; swap to host or recompute).
  Swapped requests come back with identical KV bytes, recomputed ones are re-prefilled.

Everything the loop does is recorded in :attr:`EngineLoop.metrics` (:mod:`scheduler.metrics`).
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from arena import PagedArena

from .costs import ArenaOp, CostModel
from .decision import Decision
from .latency import LatencyModel, prefill_attn_pairs
from .memory import MEMORY_POLICIES, PolicySettings
from .metered import DECODE, MAPPER_MODES, PREFILL, Clock, MeteredArena
from .metrics import (EVENT_END, EVENT_PREEMPT, EVENT_START, EVENT_STEP, EVENT_WINDOW,
                      Metrics, RequestRecord)
from .planner import PlannerConfig
from .policies import PREEMPTION_MODES, VICTIM_ORDERS
from .predictor import PREDICTORS
from .request import Phase, Request, RequestSet


@dataclass
class Batch:
    """One model step's work, as plain data.

    Per entry (sequence), arrays of length ``n``: ``req_ids`` int64; ``num_tokens`` int32
    (tokens processed this step: a prompt chunk, or 1 for decode); ``context_lens`` int32
    (K/V tokens of the sequence once this step's are written: the ``seq_lens`` of the
    attention kernels); ``is_prefill`` bool; ``block_table_rows`` int32 (rows of
    ``arena.tables.device_table``). Per token, arrays of length ``T = num_tokens.sum()``:
    ``slot_mapping`` int64 (``block_id * block_size + offset`` where the token's K/V go)
    and ``positions`` int64 (the token's position in its sequence). ``query_start_loc``
    int32 ``[n + 1]``: cumulative ``num_tokens`` from 0.
    """

    req_ids: np.ndarray
    num_tokens: np.ndarray
    context_lens: np.ndarray
    is_prefill: np.ndarray
    block_table_rows: np.ndarray
    slot_mapping: np.ndarray
    positions: np.ndarray
    query_start_loc: np.ndarray

    @property
    def num_seqs(self) -> int:
        """Sequences in the batch."""
        return int(self.req_ids.shape[0])

    def work(self) -> tuple[float, float, float, float]:
        """The latency model's features of this step: prompt tokens, prompt attention
        pairs, decode sequences, decode context tokens (see :mod:`scheduler.latency`)."""
        pre = self.is_prefill
        t = self.num_tokens[pre].astype(np.float64)
        ctx = self.context_lens.astype(np.float64)
        pairs = prefill_attn_pairs(t, ctx[pre] - t)
        dec = ~pre
        return float(t.sum()), pairs, float(dec.sum()), float(ctx[dec].sum())


ModelStep = Callable[[Batch], float]


def latency_step(model: LatencyModel) -> ModelStep:
    """A model step that does no work and reports ``model``'s predicted duration: what
    benchmarks plug in to replay traces with a modeled GPU. The model used here is
    independent of the loop's (which learns online)."""
    if not isinstance(model, LatencyModel):
        raise TypeError(f"model must be a LatencyModel, got {type(model).__name__}")

    def step(batch: Batch) -> float:
        return model.predict_step(*batch.work())

    return step


@dataclass
class LoopConfig:
    """Settings of :class:`EngineLoop`.

    ``memory``: "static", "on-demand" or "windowed". ``predictor``: remaining-length
    predictor ("max_tokens", "empirical", "oracle" or an object; windowed only).
    ``token_budget``: tokens per step. ``max_prefill_tokens``: prompt tokens admitted into
    the batch in flight (default: the token budget; one request is always admitted into an
    empty one). ``max_running``: sequences admitted at once (default and upper bound: the
    arena's block-table rows). ``cap_bytes``: the most memory the arena may map (default:
    its reserved range); it is never exceeded. ``static_bytes``: what ``static`` maps at
    start (default ``cap_bytes``). ``on_demand_chunks``: chunks ``on-demand`` grows a lease
    by. ``watermark_fraction``: free share the reactive policies keep when admitting.
    ``planner``: a :class:`PlannerConfig` for ``windowed`` (the block geometry, token
    budget, running and prefill limits, victim order and preemption mode come from the loop
    as :class:`~scheduler.planner.PlanLimits`; leave them None there, a contradicting value
    is a ValueError). ``predictor``, ``victim``, ``preemption``: names in
    :data:`~scheduler.predictor.PREDICTORS`, :data:`~scheduler.policies.VICTIM_ORDERS`,
    :data:`~scheduler.policies.PREEMPTION_MODES` ("auto", "swap", "recompute"), or objects.
    ``host_bandwidth``: bytes/s of the host link (swap cost estimate). ``observe_latency``:
    feed step durations to the latency model. ``oversize``: "raise" (ValueError) or
    "reject" (counted, dropped) for a request whose prompt + max_tokens cannot fit under
    the cap. ``sample_every``: a timeline sample every that many steps (0: none; samples
    at windows, maps, unmaps and preemptions are always taken). ``mapper``: the background
    mapper, one of :data:`~scheduler.metered.MAPPER_MODES` ("off": every driver call on the
    loop's thread; "inline": the replay's model of a mapper thread, which needs a modeled
    cost model; "thread": :class:`arena.BackgroundMapper`); ``mapper_slack``: its
    hysteresis band, a share of the spare target; ``prefetch_quantile``: the quantile of
    recent unforeseen per-step demand (admissions) the elastic policies keep mapped ahead.
    """

    memory: str = "windowed"
    predictor: Any = "empirical"
    token_budget: int = 2048
    max_prefill_tokens: int | None = None
    max_running: int | None = None
    cap_bytes: int | None = None
    static_bytes: int | None = None
    on_demand_chunks: int = 1
    watermark_fraction: float = 0.01
    planner: PlannerConfig | None = None
    victim: Any = "most-recent"
    preemption: str = "auto"
    host_bandwidth: float = 25e9
    observe_latency: bool = True
    oversize: str = "raise"
    sample_every: int = 1
    mapper: str = "off"
    mapper_slack: float = 0.5
    prefetch_quantile: float = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.memory, str):
            raise TypeError(f"memory must be a name, got {type(self.memory).__name__}")
        MEMORY_POLICIES.check(self.memory)
        for name in ("token_budget", "on_demand_chunks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("max_prefill_tokens", "max_running", "cap_bytes", "static_bytes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                  or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if not 0 <= self.watermark_fraction < 1:
            raise ValueError(f"watermark_fraction must be in [0, 1), got "
                             f"{self.watermark_fraction!r}")
        if isinstance(self.sample_every, bool) or not isinstance(self.sample_every, int) \
                or self.sample_every < 0:
            raise ValueError(f"sample_every must be an int >= 0, got {self.sample_every!r}")
        if self.mapper not in MAPPER_MODES:
            raise ValueError(f"mapper must be one of {MAPPER_MODES}, got {self.mapper!r}")
        if not (isinstance(self.mapper_slack, (int, float)) and 0 <= self.mapper_slack < math.inf):
            raise ValueError(f"mapper_slack must be a finite number >= 0, got "
                             f"{self.mapper_slack!r}")
        if not (isinstance(self.prefetch_quantile, (int, float))
                and 0 <= self.prefetch_quantile <= 1):
            raise ValueError(f"prefetch_quantile must be in [0, 1], got "
                             f"{self.prefetch_quantile!r}")
        if self.oversize not in ("raise", "reject"):
            raise ValueError(f"oversize must be 'raise' or 'reject', got {self.oversize!r}")
        if self.planner is not None and not isinstance(self.planner, PlannerConfig):
            raise TypeError("planner must be a PlannerConfig or None")
        VICTIM_ORDERS.check(self.victim)
        PREDICTORS.check(self.predictor)
        PREEMPTION_MODES.check(self.preemption)
        if not self.host_bandwidth > 0:
            raise ValueError(f"host_bandwidth must be > 0, got {self.host_bandwidth!r}")


class EngineLoop:
    """Runs requests through an arena (see the module docstring).

    Args:
        arena: a :class:`arena.PagedArena`; the loop uses its pools "prefill" and "decode".
        step_fn: the model step, ``(Batch) -> seconds``.
        latency: the :class:`LatencyModel` the planner predicts with (fitted online from
            the durations ``step_fn`` returns when ``config.observe_latency``).
        config: a :class:`LoopConfig`.
        cost_model: a :class:`~scheduler.costs.CostModel` or ``(ArenaOp) -> seconds``,
            charged to the clock per arena operation; default the measured wall-clock time.
        start_s: the clock's start (seconds).

    Who owns what: the loop owns the queues, the batches and every request's state (a
    request's phase changes only in :meth:`_move`); :attr:`metered` (a
    :class:`~scheduler.metered.MeteredArena`) owns the arena, the pools, the cap and the
    arena counters; :attr:`memory` (the policy) owns its own window state.
    """

    def __init__(self, arena, step_fn: ModelStep, latency: LatencyModel,
                 config: LoopConfig | None = None, *,
                 cost_model: CostModel | Callable[[ArenaOp], float] | None = None,
                 start_s: float = 0.0) -> None:
        if not isinstance(arena, PagedArena):
            raise TypeError(f"arena must be a PagedArena, got {type(arena).__name__}")
        if not callable(step_fn):
            raise TypeError("step_fn must be callable: (Batch) -> seconds")
        if not isinstance(latency, LatencyModel):
            raise TypeError(f"latency must be a LatencyModel, got {type(latency).__name__}")
        self.config = cfg = config if config is not None else LoopConfig()
        if not isinstance(cfg, LoopConfig):
            raise TypeError(f"config must be a LoopConfig, got {type(config).__name__}")
        self.arena = arena
        self.spec = arena.spec
        self.step_fn = step_fn
        self.latency = latency
        self.predictor = PREDICTORS.resolve(cfg.predictor)
        self.victim = VICTIM_ORDERS.resolve(cfg.victim)
        self.preemption = PREEMPTION_MODES.resolve(cfg.preemption,
                                                   host_bandwidth=cfg.host_bandwidth)
        self.block_size = self.spec.block_size
        self.block_bytes = self.spec.block_bytes
        self.max_running = min(cfg.max_running or arena.tables.max_seqs, arena.tables.max_seqs)
        self.max_prefill_tokens = cfg.max_prefill_tokens or cfg.token_budget

        self.clock = Clock(start_s)
        self.metrics = Metrics(start_s=self.now, end_s=self.now,
                               token_bytes=self.spec.token_bytes)
        #: every arena operation goes through here (charged to :attr:`clock`)
        self.metered = MeteredArena(arena, cap_bytes=cfg.cap_bytes, cost_model=cost_model,
                                    counters=self.metrics.counters, clock=self.clock,
                                    on_event=self._sample, mapper=cfg.mapper,
                                    mapper_slack=cfg.mapper_slack)
        self.cost_model = self.metered.cost_model
        #: the pools, for reading (leases and holdings change through :attr:`metered`)
        self.pool_prefill = self.metered.pools[PREFILL]
        self.pool_decode = self.metered.pools[DECODE]
        self.requests: dict[int, Request] = {}
        self._pending: list[tuple[float, int, Request]] = []
        self._resume: list[Request] = []        # preempted, sorted by admit_seq
        self._new: list[Request] = []           # arrived, FIFO (head at index _new_head)
        self._new_head = 0
        self._prefill: dict[int, Request] = {}
        self._decode: dict[int, Request] = {}
        self._next_admit = 0
        self._submitted = 0
        self._live_tokens = 0
        self._swapped = 0
        self._launched: list[tuple[Request, int, bool]] = []   # the batch in flight
        self.dirty = True          # something changed that may allow an admission
        #: what memory policies see of the queues (read-only)
        self.view = _LoopView(self)
        settings = PolicySettings(
            latency=latency, predictor=self.predictor, victim=self.victim,
            preemption=self.preemption, token_budget=cfg.token_budget,
            max_running=self.max_running, max_prefill_tokens=self.max_prefill_tokens,
            watermark_fraction=cfg.watermark_fraction, on_demand_chunks=cfg.on_demand_chunks,
            static_bytes=cfg.static_bytes, planner=cfg.planner,
            prefetch_quantile=cfg.prefetch_quantile)
        self.memory = MEMORY_POLICIES.resolve(cfg.memory, arena=self.metered, settings=settings)
        self._sample(EVENT_START)
        self.memory.start()

    @property
    def now(self) -> float:
        """The loop's clock (seconds): model steps plus charged arena operations."""
        return self.clock.now

    @now.setter
    def now(self, value: float) -> None:
        self.clock.now = float(value)

    @property
    def cap_blocks(self) -> int:
        """The most blocks the arena may map (whole chunks under the cap)."""
        return self.metered.cap_blocks

    @property
    def cap_bytes(self) -> int:
        """:attr:`cap_blocks` in bytes."""
        return self.metered.cap_bytes

    # ------------------------------------------------------------------ submission
    def submit(self, request: Request) -> None:
        """Queue ``request`` to arrive at its ``arrival_s`` (never before the clock)."""
        if not isinstance(request, Request):
            raise TypeError(f"request must be a Request, got {type(request).__name__}")
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id} was already submitted")
        if request.phase != Phase.PENDING:
            raise ValueError(f"request {request.req_id} is not fresh (phase {request.phase.name})")
        final = request.prompt_tokens + request.max_tokens - 1
        if (self.spec.blocks_for(final) > self.limit_blocks()
                or self.spec.blocks_for(final) > self.arena.tables.max_blocks_per_seq):
            if self.config.oversize == "raise":
                raise ValueError(f"request {request.req_id}: prompt_tokens + max_tokens "
                                 f"({final + 1}) cannot fit under the memory cap")
            self.metrics.counters.rejected += 1
            self._move(request, Phase.FINISHED)
            request.extra["rejected"] = True
            self.requests[request.req_id] = request
            return
        if self.predictor.wants_true_lengths:
            self.predictor.reveal(request.req_id, request.target)
        self.requests[request.req_id] = request
        heapq.heappush(self._pending, (request.arrival_s, self._submitted, request))
        self._submitted += 1

    def submit_many(self, requests: Iterable[Request]) -> None:
        """:meth:`submit` each of ``requests``."""
        for r in requests:
            self.submit(r)

    # ------------------------------------------------------------------ views
    @property
    def prefill_requests(self) -> list[Request]:
        """Requests prefilling now, in admission order."""
        return list(self._prefill.values())

    @property
    def decode_requests(self) -> list[Request]:
        """Requests decoding now."""
        return list(self._decode.values())

    def waiting_requests(self) -> list[Request]:
        """The admission queue: preempted requests (oldest admission first), then arrivals
        in arrival order (a copy of the whole queue: the loop itself takes only the head it
        can admit, :meth:`_waiting_head`)."""
        return self._resume + self._new[self._new_head:]

    def _waiting_head(self, n: int) -> list[Request]:
        """The first ``n`` of :meth:`waiting_requests`, without copying the rest."""
        head = self._resume[:n]
        if len(head) < n:
            h = self._new_head
            head = head + self._new[h:h + n - len(head)]
        return head

    @property
    def num_waiting(self) -> int:
        """Requests in the admission queue (swapped ones included)."""
        return len(self._resume) + len(self._new) - self._new_head

    @property
    def idle(self) -> bool:
        """True when every submitted request has finished (or was rejected)."""
        return not (self._pending or self._prefill or self._decode or self.num_waiting)

    def limit_blocks(self) -> int:
        """Blocks the pools could ever lease: the cap, or less where the device cannot map
        that much (its free memory plus what is mapped now); ``static`` lowers the cap to
        what it maps at start."""
        return self.metered.limit_blocks()

    def supply_blocks(self) -> int:
        """Blocks the two pools may lease in all now: their leases plus mapped-unleased
        blocks plus what the device can still map, under the cap."""
        return self.metered.supply_blocks()

    def prefill_tokens_left(self) -> int:
        """Prompt tokens the prefill set has still to process."""
        return sum(r.prefill_len - r.kv_len for r in self._prefill.values())

    def prompt_blocks_to_come(self) -> int:
        """Blocks the prefill set's prompts will still allocate (prompt blocks are
        allocated chunk by chunk, but an admission counts the whole prompt)."""
        blocks_for = self.spec.blocks_for
        return sum(blocks_for(r.prefill_len) - r.num_blocks for r in self._prefill.values())

    def next_step_blocks(self) -> int:
        """Blocks the running requests of the batch in flight will allocate in the next
        step, if none is preempted and nothing is admitted: decode rows (and prompts that
        finish now) whose next token opens a block, and the next prompt chunks under the
        token budget. What the background mapper maps ahead of need."""
        bs = self.block_size
        budget = self.config.token_budget
        need = 0
        chunks = []
        for r, n, is_pre in self._launched:
            kv = r.kv_len + n
            if is_pre and kv < r.prefill_len:
                chunks.append((r, kv))
                continue
            if r.generated + 1 >= r.target:
                continue    # finishes with this step
            budget -= 1
            if kv % bs == 0:
                need += max(kv // bs + 1 - r.num_blocks, 0)
        for r, kv in chunks:
            if budget < 1:
                break
            n = min(r.prefill_len - kv, budget)
            budget -= n
            need += max(-(-(kv + n) // bs) - r.num_blocks, 0)
        return need

    # ------------------------------------------------------------------ running
    def run(self, *, max_steps: int | None = None, until_s: float | None = None) -> Metrics:
        """Step until every request has finished (or ``max_steps`` steps / the clock passes
        ``until_s``); returns :attr:`metrics`."""
        steps = 0
        while not self.idle:
            if max_steps is not None and steps >= max_steps:
                break
            if until_s is not None and self.now >= until_s:
                break
            self.step()
            steps += 1
        self.metrics.end_s = self.now
        self.metered.sync_background()
        if self.idle:
            self._sample(EVENT_END)
        return self.metrics

    def step(self) -> bool:
        """One iteration: arrivals, memory (windows, admission), one model step, updates.

        Returns False when there was nothing to do (every request finished).
        """
        self._arrivals()
        if not (self._prefill or self._decode or self.num_waiting):
            if not self._pending:
                return False
            self.now = max(self.now, self._pending[0][0])  # idle: jump to the next arrival
            self._arrivals()
        preempted_before = self.metrics.counters.preemptions
        t0 = time.perf_counter()
        decision = self.memory.decide(self.view)
        if decision is not None:
            if decision.plan is not None:
                self.metrics.counters.plan_wall_s += time.perf_counter() - t0
            self.carry_out(decision)
        entries = self._form_batch()
        if not entries:
            if self.metrics.counters.preemptions != preempted_before:
                return True   # requests went back to the queue; try again
            if not (self._prefill or self._decode) and self._pending:
                self.now = max(self.now, self._pending[0][0])
                return True
            raise RuntimeError(
                f"no request can make progress: {len(self._prefill)} prefilling, "
                f"{len(self._decode)} decoding, {self.num_waiting} waiting, "
                f"supply {self.supply_blocks()} blocks")
        batch = self._make_batch(entries)
        self._launched = entries
        target = self.memory.spare_target(self.view)
        if target is not None:
            # The mapper works while the step runs: maps what the next step is expected to
            # take, unmaps what was freed beyond it.
            self.metered.map_ahead(target)
        duration = float(self.step_fn(batch))
        if not (math.isfinite(duration) and duration >= 0):
            raise ValueError(f"step_fn returned {duration!r}; it must return seconds >= 0")
        if self.config.observe_latency:
            self.latency.observe(*batch.work(), duration)
        self.now += duration
        c = self.metrics.counters
        c.model_time_s += duration
        c.steps += 1
        self._complete(entries)
        self.memory.after_step(self.view)
        self.metrics.end_s = self.now
        if self.config.sample_every and c.steps % self.config.sample_every == 0:
            self._sample(EVENT_STEP)
        return True

    def carry_out(self, decision: Decision) -> None:
        """Carry out a memory policy's decision, in its documented order: preemptions,
        lease targets, shrink, admissions; then count the plan and the window."""
        if not isinstance(decision, Decision):
            raise TypeError(f"decision must be a Decision, got {type(decision).__name__}")
        for rid, swap in decision.preempt:
            self.preempt(self.requests[rid], bool(swap))
        self.metrics.counters.preemptions_planned += len(decision.preempt)
        m = self.metered
        if decision.targets is not None:
            m.set_leases(*decision.targets)
        if decision.budgets is not None:
            m.lower_to(PREFILL, decision.budgets[0])
            m.lower_to(DECODE, decision.budgets[1])
        if decision.shrink:
            m.shrink(decision.keep_blocks)
        if decision.fcfs:
            self._admit_fcfs(decision.watermark_blocks)
        elif decision.admit > 0:
            for r in self._waiting_head(decision.admit):
                if not self.admit(r):
                    break
        c = self.metrics.counters
        if decision.plan is not None:
            c.plans += 1
        if decision.window_end:
            c.windows += 1
            self._sample(EVENT_WINDOW)
        self.memory.carried_out(self.view, decision)
        self.dirty = False

    # ------------------------------------------------------------------ request state
    def _move(self, r: Request, to: Phase) -> None:
        """The one place a request's phase changes: it leaves the queue or running set of
        its phase and enters the one of ``to`` (a request leaving the admission queue must
        be at its head; ``PENDING`` requests were popped from the arrival heap already)."""
        frm = r.phase
        if frm == Phase.PREFILL:
            del self._prefill[r.req_id]
        elif frm == Phase.DECODE:
            del self._decode[r.req_id]
        elif frm in (Phase.WAITING, Phase.SWAPPED):
            self._pop_waiting(r)
            if frm == Phase.SWAPPED:
                self._swapped -= 1
        pool = ""
        if to == Phase.PREFILL:
            self._prefill[r.req_id] = r
            pool = PREFILL
        elif to == Phase.DECODE:
            self._decode[r.req_id] = r
            pool = DECODE
        elif to == Phase.WAITING and r.admit_seq < 0:
            self._new.append(r)                 # a new arrival
        elif to in (Phase.WAITING, Phase.SWAPPED):
            # Back in the queue, before every later admission and every new arrival.
            i = 0
            while i < len(self._resume) and self._resume[i].admit_seq < r.admit_seq:
                i += 1
            self._resume.insert(i, r)
            if to == Phase.SWAPPED:
                self._swapped += 1
        r.phase = to
        r.pool = pool

    def _arrivals(self) -> None:
        pend = self._pending
        while pend and pend[0][0] <= self.now:
            self._move(heapq.heappop(pend)[2], Phase.WAITING)
            self.dirty = True
        if self._new_head > 1024 and self._new_head * 2 > len(self._new):
            del self._new[:self._new_head]
            self._new_head = 0

    def _pop_waiting(self, r: Request) -> None:
        if self._resume and self._resume[0] is r:
            self._resume.pop(0)
        elif self._new_head < len(self._new) and self._new[self._new_head] is r:
            self._new_head += 1
        else:
            raise ValueError(f"request {r.req_id} is not at the head of the queue")

    def _admit_fcfs(self, watermark: int) -> None:
        """Admit from the head of the queue while sequences, the prefill token budget and
        free memory (less ``watermark`` blocks) allow; stop at the first that does not fit."""
        if not self.num_waiting:
            return
        room = self.max_running - len(self._prefill) - len(self._decode)
        tokens = self.prefill_tokens_left()
        # Prompts admitted earlier still have blocks to allocate: those are spoken for.
        committed = self.prompt_blocks_to_come()
        # Only the head that could run: a copy of a long queue per step costs O(queue).
        for r in self._waiting_head(max(room, 0)):
            if room <= 0:
                break
            swapped = r.phase == Phase.SWAPPED
            if swapped:
                need = int(r.swap_data.shape[0])
            else:
                need = self.spec.blocks_for(r.prefill_len)
                if self._prefill and tokens + r.prefill_len > self.max_prefill_tokens:
                    break
            # what admit() checks too: free memory plus the prefill pool's unused lease
            room_blocks = self.metered.free_blocks() + self.metered.unused_lease(PREFILL)
            if need + watermark + committed > room_blocks and (self._prefill or self._decode):
                break
            if not self.admit(r):
                break
            room -= 1
            if not swapped:
                tokens += r.prefill_len
                committed += need

    def admit(self, r: Request) -> bool:
        """Admit the head of the queue ``r``: a swapped request gets its blocks back (swap-in)
        and decodes; any other starts a prefill, its prompt blocks allocated chunk by chunk
        as the prefill proceeds (:meth:`_form_batch`). A swap-in's lease comes from the
        pool, grown by the memory policy if needed (no preemption); a prompt is admitted
        only if its whole prompt fits in the pool's unused lease plus the free memory, less
        what earlier prompts have still to allocate. Returns False (nothing changed) when
        the memory is not there."""
        swapped = r.phase == Phase.SWAPPED
        pool = DECODE if swapped else PREFILL
        m = self.metered
        if swapped:
            need = int(r.swap_data.shape[0])
            free = m.unused_lease(pool)
            if free < need and not self.memory.grow(pool, need - free, admission=True):
                return False
        else:
            need = 0
            if (self.spec.blocks_for(r.prefill_len) + self.prompt_blocks_to_come()
                    > m.unused_lease(pool) + m.free_blocks()):
                return False
        self._move(r, Phase.DECODE if swapped else Phase.PREFILL)
        if r.admit_seq < 0:
            r.admit_seq = self._next_admit
            self._next_admit += 1
            r.admit_s = self.now
        ids = self.metered.open_sequence(r.req_id, pool, need)
        r.num_blocks = need
        if swapped:
            self.metered.swap_in(r.swap_data, ids)
            r.swap_data = None
            self._live_tokens += r.kv_len
        else:
            r.kv_len = 0
        return True

    def _form_batch(self) -> list[tuple[Request, int, bool]]:
        budget = self.config.token_budget
        entries: list[tuple[Request, int, bool]] = []
        scheduled: set[int] = set()
        bs = self.block_size
        for r in sorted(self._decode.values(), key=_by_admission):
            if budget < 1:
                break
            if r.req_id not in self._decode:
                continue   # preempted for a request scheduled earlier in this step
            need = -(-(r.kv_len + 1) // bs) - r.num_blocks
            if need > 0 and not self._get_blocks(r, DECODE, need, scheduled):
                continue
            entries.append((r, 1, False))
            scheduled.add(r.req_id)
            budget -= 1
        for r in sorted(self._prefill.values(), key=_by_admission):
            if budget < 1:
                break
            if r.req_id not in self._prefill:
                continue
            n = min(r.prefill_len - r.kv_len, budget)
            need = -(-(r.kv_len + n) // bs) - r.num_blocks
            if need > 0 and not self._get_blocks(r, PREFILL, need, scheduled):
                continue
            entries.append((r, n, True))
            scheduled.add(r.req_id)
            budget -= n
        return entries

    def _get_blocks(self, r: Request, pool: str, need: int, scheduled: set[int]) -> bool:
        """Give running request ``r`` ``need`` more blocks from ``pool``: from its lease, by
        growing the lease, or by preempting others (or ``r`` itself). False if ``r`` went."""
        missed = False
        m = self.metered
        while True:
            free = m.unused_lease(pool)
            if free >= need:
                m.extend_sequence(r.req_id, pool, need)
                r.num_blocks += need
                return True
            if not missed:
                self.metrics.counters.lease_misses += 1
                missed = True
            if self.memory.grow(pool, need - free):
                continue
            victim = self._pick_victim(r, scheduled)
            self.preempt(victim, self._swap_choice(victim))
            if victim is r:
                return False

    def _pick_victim(self, r: Request, scheduled: set[int]) -> Request:
        cands = [x for x in self._decode.values() if x.req_id not in scheduled and x is not r]
        cands += [x for x in self._prefill.values() if x.req_id not in scheduled and x is not r]
        cands.append(r)
        s = RequestSet.from_requests(cands)
        rem = self.predictor.predict(s.ids, s.generated, s.max_tokens)
        return cands[int(np.asarray(self.victim(s, rem))[0])]

    def _swap_choice(self, r: Request) -> bool:
        if r.phase != Phase.DECODE:
            return False
        return bool(self.preemption(np.array([r.kv_len]), np.array([r.num_blocks]),
                                    self.block_bytes, self.latency)[0])

    def preempt(self, r: Request, swap: bool) -> None:
        """Take running request ``r`` off the device: its blocks are swapped to the host
        (decode requests, ``swap=True``) or dropped to be recomputed by a new prefill of
        its prompt and every token generated so far; its pool's lease drops by as many
        blocks; it waits at the head of the queue (by admission order)."""
        if r.phase == Phase.PREFILL:
            swap = False   # a half-done prompt is cheaper to redo than to store
        elif r.phase != Phase.DECODE:
            raise ValueError(f"request {r.req_id} is not running (phase {r.phase.name})")
        pool = r.pool
        m = self.metered
        c = self.metrics.counters
        if swap:
            r.swap_data = m.swap_out(m.sequence_blocks(r.req_id))
            c.preemptions_swap += 1
        else:
            c.preemptions_recompute += 1
            c.recomputed_tokens += r.kv_len
            if r.phase == Phase.DECODE:
                r.prefill_len = r.prompt_tokens + r.generated
        n = int(m.close_sequence(r.req_id, pool).size)
        m.lower_to(pool, m.lease(pool) - n)
        self._live_tokens -= r.kv_len
        if not swap:
            r.kv_len = 0
        r.num_blocks = 0
        r.num_preemptions += 1
        self._move(r, Phase.SWAPPED if swap else Phase.WAITING)
        self.dirty = True
        self._sample(EVENT_PREEMPT)

    def _make_batch(self, entries: list[tuple[Request, int, bool]]) -> Batch:
        n = len(entries)
        ids = np.fromiter((e[0].req_id for e in entries), dtype=np.int64, count=n)
        ntok = np.fromiter((e[1] for e in entries), dtype=np.int64, count=n)
        start = np.fromiter((e[0].kv_len for e in entries), dtype=np.int64, count=n)
        is_pre = np.fromiter((e[2] for e in entries), dtype=bool, count=n)
        tables = self.arena.tables
        rows = tables.rows(ids.tolist())
        qsl = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(ntok, out=qsl[1:])
        total = int(qsl[-1])
        seq = np.repeat(np.arange(n), ntok)
        pos = np.arange(total, dtype=np.int64) - qsl[:-1][seq] + start[seq]
        bs = self.block_size
        blk = tables.host[rows[seq], pos // bs].astype(np.int64)
        slots = blk * bs + pos % bs
        return Batch(req_ids=ids, num_tokens=ntok.astype(np.int32),
                     context_lens=(start + ntok).astype(np.int32), is_prefill=is_pre,
                     block_table_rows=rows.astype(np.int32), slot_mapping=slots,
                     positions=pos, query_start_loc=qsl.astype(np.int32))

    def _complete(self, entries: list[tuple[Request, int, bool]]) -> None:
        c = self.metrics.counters
        for r, n, is_pre in entries:
            r.kv_len += n
            self._live_tokens += n
            if is_pre:
                c.prefill_tokens += n
                self.dirty = True   # room in the prefill batch: an admission may fit now
                if r.kv_len < r.prefill_len:
                    continue
                r.generated += 1
                c.prefills_completed += 1
                if math.isnan(r.first_token_s):
                    r.first_token_s = self.now
                if r.generated >= r.target:
                    self._finish(r)
                    continue
                # Hand-off: ownership and lease move, no byte is copied.
                self.metered.hand_off(r.req_id)
                self._move(r, Phase.DECODE)
            else:
                c.decode_tokens += 1
                r.generated += 1
                if r.generated >= r.target:
                    self._finish(r)

    def _finish(self, r: Request) -> None:
        pool = r.pool
        ids = self.metered.close_sequence(r.req_id, pool)
        self.memory.on_free(pool, int(ids.size), r.req_id)
        self._live_tokens -= r.kv_len
        r.num_blocks = 0
        r.finish_s = self.now
        self._move(r, Phase.FINISHED)
        self.predictor.observe_finished(r.generated, r.max_tokens)
        self.metrics.counters.finished += 1
        self.metrics.requests.append(RequestRecord(
            r.req_id, r.arrival_s, r.admit_s, r.first_token_s, r.finish_s, r.prompt_tokens,
            r.generated, r.num_preemptions))
        self.dirty = True

    def _sample(self, event: int) -> None:
        a = self.arena
        bb = self.block_bytes
        self.metrics.timeline.append(
            self.now, a.mapped_bytes, self.pool_prefill.lease * bb, self.pool_decode.lease * bb,
            a.used_blocks * bb, self._live_tokens * self.spec.token_bytes, len(self._prefill),
            len(self._decode), self.num_waiting - self._swapped, self._swapped, event)


class _LoopView:
    """The loop's queues as memory policies see them (:class:`~scheduler.decision.QueueView`)."""

    __slots__ = ("_loop",)

    def __init__(self, loop: EngineLoop) -> None:
        self._loop = loop

    @property
    def now(self) -> float:
        return self._loop.clock.now

    @property
    def num_prefill(self) -> int:
        return len(self._loop._prefill)

    @property
    def num_decode(self) -> int:
        return len(self._loop._decode)

    @property
    def num_waiting(self) -> int:
        return self._loop.num_waiting

    @property
    def max_running(self) -> int:
        return self._loop.max_running

    @property
    def max_prefill_tokens(self) -> int:
        return self._loop.max_prefill_tokens

    @property
    def next_arrival_s(self) -> float:
        p = self._loop._pending
        return p[0][0] if p else math.inf

    @property
    def changed(self) -> bool:
        return self._loop.dirty

    @property
    def prompt_tokens_processed(self) -> int:
        return self._loop.metrics.counters.prefill_tokens

    @property
    def preemptions(self) -> int:
        return self._loop.metrics.counters.preemptions

    def prefill_tokens_left(self) -> int:
        return self._loop.prefill_tokens_left()

    def next_step_blocks(self) -> int:
        return self._loop.next_step_blocks()

    def prefill_set(self) -> RequestSet:
        # In the order the loop chunks prompts (admission), which the planner's hand-off
        # steps follow.
        return RequestSet.from_requests(sorted(self._loop._prefill.values(), key=_by_admission))

    def decode_set(self) -> RequestSet:
        return RequestSet.from_requests(self._loop._decode.values())

    def waiting_set(self, n: int) -> RequestSet:
        return RequestSet.from_requests(self._loop._waiting_head(n))


def _by_admission(r: Request) -> int:
    return r.admit_seq
