"""When the elastic policies give memory back: at a finish (after the same phase's
admissions), the windowed policy's lease at a finish, and nothing mapped across idle gaps."""
import dataclasses

import numpy as np

from scheduler import Request
from scheduler.metered import DECODE
from tests.scheduler_helpers import make_arena, make_loop


def _one_at_a_time(n, prompt=12, out=6, arrival_s=0.0):
    return [Request(i, prompt, out, out, arrival_s=arrival_s) for i in range(n)]


def test_on_demand_reuses_a_finished_requests_chunk_for_the_next_admission():
    """One sequence at a time, all queued from the start: each finish frees a chunk the
    next admission takes. Releasing before the admission would unmap and map it again per
    request; after the admission nothing is unmapped until the engine goes idle."""
    loop = make_loop(make_arena(chunks=32), memory="on-demand", max_running=1)
    loop.submit_many(_one_at_a_time(6, prompt=6, out=4))   # 9 tokens: 3 blocks, one chunk
    loop.run()
    c = loop.metrics.counters
    assert c.finished == 6
    assert (c.map_calls, c.unmap_calls) == (1, 1)
    assert loop.arena.mapped_blocks == 0   # idle at the end: everything went back


def test_nothing_stays_mapped_across_an_idle_gap():
    """Two bursts 10 s apart: both elastic policies hold nothing during the gap."""
    for memory in ("on-demand", "windowed"):
        loop = make_loop(make_arena(chunks=32), memory=memory)
        reqs = _one_at_a_time(3) + [Request(10 + i, 12, 6, 6, arrival_s=10.0) for i in range(3)]
        loop.submit_many(reqs)
        while loop.metrics.counters.finished < 3:
            loop.step()
        assert loop.now < 5.0
        assert loop.arena.mapped_blocks == 0 and loop.arena.leased_blocks == 0, memory
        loop.run()
        assert loop.metrics.counters.finished == 6 and loop.arena.mapped_blocks == 0
    assert loop.metrics.counters.idle_closes == 2


def test_windowed_finish_gives_back_the_blocks_and_the_growth_planned_for_it():
    loop = make_loop(make_arena(chunks=32), memory="windowed")
    loop.submit_many(_one_at_a_time(3, prompt=12, out=30))
    while not loop.decode_requests:
        loop.step()
    m, pol = loop.metered, loop.memory
    r = loop.decode_requests[0]
    held = r.num_blocks
    # Pretend the plan held 5 more blocks of growth for r than it holds now.
    pol.plan = dataclasses.replace(pol.plan, decode_ids=np.array([r.req_id]),
                                   decode_planned_blocks=np.array([held + 5]))
    m.set_leases(m.lease("prefill"), m.owned(DECODE) + 8)
    before = m.lease(DECODE)
    pol.on_free(DECODE, held, r.req_id)
    assert m.lease(DECODE) == max(before - held - 5, m.owned(DECODE))
    # A request the plan did not count gives back its blocks only.
    before = m.lease(DECODE)
    pol.on_free(DECODE, 1, 10 ** 6)
    assert m.lease(DECODE) == max(before - 1, m.owned(DECODE))
