"""All three layers at once: the engine loop (scheduler) drives the arena, and every step
runs the real kernels over the arena's paged views — write_kv for the new tokens, then
paged_prefill_attention for the whole mixed batch (prompt chunks and decode rows) and
paged_decode_attention for the decode rows — checked against attention computed from the
K/V each request *should* have, laid out contiguously, independent of the arena. Windows
shrink (compaction moves blocks) and a tight cap forces preemptions, so the kernels read
blocks at their new ids after moves, swaps and recomputes."""
import numpy as np
import pytest
import torch

import kernels
from arena import KVSpec
from kernels.reference import _attend
from scheduler import EngineLoop, LatencyModel, LoopConfig, ModeledGPUCost, Request
from scheduler.request import Phase
from scheduler.synthetic import SyntheticKVModel
from tests.scheduler_helpers import LAT, PAGE, OneTokenLeft, make_arena, planner_config

NUM_HEADS = 4  # GQA: 2 query heads per KV head
SPEC = KVSpec(num_layers=1, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.float16)


class AttendingModel(SyntheticKVModel):
    """Writes K/V like SyntheticKVModel, then attends with the paged kernels and compares."""

    def __init__(self, arena):
        super().__init__(arena, 1e-3)
        self.checked_rows = 0
        self.decode_launches = 0

    def queries(self, batch):
        gen = torch.Generator().manual_seed(int(batch.positions.sum()) + batch.num_seqs)
        t = int(batch.num_tokens.sum())
        return (torch.randn(t, NUM_HEADS, SPEC.head_dim, generator=gen) / 2).to(SPEC.dtype)

    def __call__(self, batch):
        duration = super().__call__(batch)
        q = self.queries(batch)
        table = self.arena.tables.device_table[torch.from_numpy(batch.block_table_rows).long()]
        seq_lens = torch.from_numpy(batch.context_lens.astype(np.int32))
        qsl = torch.from_numpy(batch.query_start_loc.astype(np.int32))
        out = kernels.paged_prefill_attention(q, self.arena.kv_cache(0), table, seq_lens, qsl)
        qsl_l = batch.query_start_loc.tolist()
        for i, rid in enumerate(batch.req_ids.tolist()):
            a, b = qsl_l[i], qsl_l[i + 1]
            ctx = int(batch.context_lens[i])
            k, v = self.expected(rid, ctx, 0)
            want = _attend(q[a:b], k, v, SPEC.head_dim ** -0.5, ctx - (b - a), torch.float32)
            torch.testing.assert_close(out[a:b].float(), want, atol=2e-3, rtol=2e-3)
            self.checked_rows += b - a
        dec = np.flatnonzero(~batch.is_prefill)
        if dec.size:
            rows = batch.query_start_loc[dec]
            d_out = kernels.paged_decode_attention(
                q[torch.from_numpy(rows).long()], self.arena.kv_cache(0),
                table[torch.from_numpy(dec).long()], seq_lens[torch.from_numpy(dec).long()])
            torch.testing.assert_close(d_out.float(), out[torch.from_numpy(rows).long()].float(),
                                       atol=2e-3, rtol=2e-3)
            self.decode_launches += 1
        return duration


# Each workload is tuned to reach one event: compaction moving live blocks, or a
# preemption by swap, or by recompute (a tight cap with every request arriving at once).
@pytest.mark.parametrize("cap_chunks, gap_s, out_base, preemption, event", [
    (3, 0.004, 4, "swap", "moves"),
    (2, 0.0, 8, "swap", "swap"),
    (2, 0.0, 8, "recompute", "recompute"),
])
def test_kernels_read_the_right_blocks_through_shrinks_and_preemptions(
        cap_chunks, gap_s, out_base, preemption, event):
    arena = make_arena(32, max_seqs=16, spec=SPEC)
    assert arena.blocks_per_chunk == 8  # 512 B blocks: small chunks, so shrinks unmap often
    model = AttendingModel(arena)
    loop = EngineLoop(arena, model, LatencyModel(LAT),
                      LoopConfig(memory="windowed", predictor=OneTokenLeft(),
                                 cap_bytes=cap_chunks * PAGE, token_budget=24,
                                 preemption=preemption,
                                 planner=planner_config(2, 6)),
                      cost_model=ModeledGPUCost())
    reqs = [Request(i, prompt_tokens=5 + 3 * i, max_tokens=20,
                    output_tokens=out_base + (i * 5) % 9, arrival_s=gap_s * i) for i in range(6)]
    loop.submit_many(reqs)
    loop.run(max_steps=500)
    assert loop.idle
    assert all(r.phase == Phase.FINISHED and r.generated == r.output_tokens for r in reqs)
    c = loop.metrics.counters
    happened = dict(moves=arena.stats()["moves"], swap=c.preemptions_swap,
                    recompute=c.preemptions_recompute)
    assert happened[event] > 0, f"the workload no longer reaches its event: {happened}"
    assert model.decode_launches > 0
    assert model.checked_rows >= sum(r.prompt_tokens + r.output_tokens - 1 for r in reqs)
    assert arena.mapped_bytes <= cap_chunks * PAGE
