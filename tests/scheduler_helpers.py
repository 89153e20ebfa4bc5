"""What the scheduler's tests share: a small host-backend geometry, arena and loop builders,
workloads, invariants and an under-predicting predictor. Import from here; do not copy."""
from __future__ import annotations

import numpy as np
import torch

from arena import KVSpec, PagedArena
from scheduler import EngineLoop, LatencyModel, LoopConfig, ModeledGPUCost, PlannerConfig, Request
from scheduler.request import Phase

#: Host page = the arena's chunk in these tests.
PAGE = 4096
#: 2 layers x K,V x 2 heads x 16 x 2 B = 256 B a token; 4-token blocks of 1 KiB: 4 a chunk.
SPEC = KVSpec(2, 2, 16, block_size=4, dtype=torch.float16)
#: Latency coefficients (s): step, prompt token, attention pair, decode seq, context token.
LAT = (1e-3, 1e-6, 1e-9, 1e-5, 1e-8)


def make_arena(chunks: int = 64, max_seqs: int = 64, device_chunks: int | None = None,
               spec: KVSpec = SPEC) -> PagedArena:
    """A host arena of ``chunks`` pages (optionally a device limit of ``device_chunks``)."""
    limit = None if device_chunks is None else device_chunks * PAGE
    return PagedArena(spec, chunks * PAGE, "cpu", granularity=PAGE, max_seqs=max_seqs,
                      device_limit_bytes=limit)


def planner_config(min_steps: int = 2, max_steps: int = 16, **kw) -> PlannerConfig:
    """Short windows and no arrival reserve: on a millisecond clock half a second of
    admissions is the whole workload (the reserve has its own tests)."""
    kw.setdefault("arrival_reserve_s", 0.0)
    return PlannerConfig(min_decode_steps=min_steps, max_decode_steps=max_steps, **kw)


def make_loop(arena: PagedArena, step=None, *, cost_model=None, latency=LAT,
              **cfg) -> EngineLoop:
    """A loop with a 32-token budget, :func:`planner_config`, a step of 1 ms (unless
    ``step``) and the modeled GPU cost (unless ``cost_model``); ``cfg`` goes to LoopConfig."""
    cfg.setdefault("token_budget", 32)
    cfg.setdefault("planner", planner_config())
    return EngineLoop(arena, step or (lambda batch: 1e-3), LatencyModel(latency),
                      LoopConfig(**cfg), cost_model=cost_model or ModeledGPUCost())


def workload(n: int, seed: int, max_prompt: int = 40, max_out: int = 40,
             gap: float = 2e-3) -> list[Request]:
    """``n`` random requests arriving within ``n * gap`` seconds."""
    rng = np.random.default_rng(seed)
    return [Request(i, int(rng.integers(1, max_prompt)), int(rng.integers(1, max_out)),
                    int(rng.integers(1, max_out)), arrival_s=float(i * gap * rng.random()))
            for i in range(n)]


def check_invariants(loop: EngineLoop, reqs: list[Request]) -> None:
    """Every request in exactly one place; pools within leases; mapped within the cap."""
    a = loop.arena
    assert a.mapped_blocks <= loop.cap_blocks
    assert a.mapped_bytes <= loop.cap_bytes
    assert a.leased_blocks <= a.mapped_blocks
    pre, dec, wait = loop.prefill_requests, loop.decode_requests, loop.waiting_requests()
    for pool, running in ((loop.pool_prefill, pre), (loop.pool_decode, dec)):
        assert pool.num_owned <= pool.lease
        assert sum(r.num_blocks for r in running) == pool.num_owned
    where = {}
    for name, group in (("prefill", pre), ("decode", dec), ("wait", wait)):
        for r in group:
            assert r.req_id not in where, f"request {r.req_id} is in two places"
            where[r.req_id] = name
    for r in reqs:
        if r.req_id in where:
            if where[r.req_id] != "wait":
                assert len(a.tables.blocks(r.req_id)) == r.num_blocks
                assert r.num_blocks >= loop.spec.blocks_for(r.kv_len)
                assert r.generated < r.target
                assert r.pool == where[r.req_id]
            else:
                assert r.phase in (Phase.WAITING, Phase.SWAPPED)
        else:
            assert r.phase in (Phase.PENDING, Phase.FINISHED), r


def run_checked(loop: EngineLoop, reqs: list[Request], max_steps: int = 20_000):
    """Step to the end, checking :func:`check_invariants` after every step; returns the
    metrics."""
    for _ in range(max_steps):
        if loop.idle:
            break
        loop.step()
        check_invariants(loop, reqs)
    assert loop.idle
    return loop.run()


class OneTokenLeft:
    """Predicts one token left for everyone: every window is too small (lease misses under
    a roomy cap, mid-window preemptions under a tight one)."""

    def predict(self, ids, generated, max_tokens):
        return np.minimum(1, max_tokens - generated)

    def observe_finished(self, generated, max_tokens):
        pass
