"""Decode steps through CUDA graphs, one per batch-size bucket (CUDA only).

A decode-only step has a fixed shape per batch size, and the arena's addresses never move
(chunks are mapped into one reserved range; compaction moves blocks, not the range), so a
graph captured once stays valid while the arena grows and shrinks. The batch is copied into
static buffers padded to the bucket: padding rows write no K/V (slot -1) and attend over one
token of the first real row's first block, which is mapped. The block tables are passed at
their full width, so the decode kernel's split count, chosen from shapes, is fixed too.
"""
from __future__ import annotations

import torch

from .model import AttentionMetadata, CausalLM


class DecodeGraphs:
    """Captures and replays ``model``'s decode forward (hidden -> fp32 logits) per bucket.

    Buckets: 1, 2, 4, 8, then multiples of 16 up to ``max_num_seqs``. A bucket's graph is
    captured the first time a batch of its size comes (after one eager warm-up run on the
    same inputs, which compiles the kernels; writing the same K/V twice is harmless).
    """

    def __init__(self, model: CausalLM, arena, max_num_seqs: int) -> None:
        self.model, self.arena = model, arena
        self.buckets = sorted({b for b in (1, 2, 4, 8) if b < max_num_seqs}
                              | set(range(16, max_num_seqs, 16)) | {max_num_seqs})
        n, dev = max_num_seqs, model.device
        width = arena.tables.max_blocks_per_seq
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None   # one memory pool shared by every bucket's graph

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(self.positions[:b], self.slots[:b], self.tables[:b],
                                 self.seq_lens[:b], self.qsl[:b + 1], decode_only=True)
        return self.model.logits(self.model.forward(self.ids[:b], meta, self.arena.kv_cache))

    def run(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """fp32 logits ``[n, vocab]`` of a decode-only batch of ``n`` sequences."""
        n = ids.shape[0]
        b = next(x for x in self.buckets if x >= n)
        w = meta.block_tables.shape[1]
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(meta.positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.tables[:n, :w].copy_(meta.block_tables)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.ids[n:b].zero_()
        self.positions[n:b].zero_()
        self.slots[n:b].fill_(-1)
        self.seq_lens[n:b].fill_(1)
        self.tables[n:b].copy_(self.tables[:1].expand(b - n, -1))
        if b not in self.graphs:
            self.graphs[b] = self.capture(b)
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]

    def capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """(graph, its logits output) for bucket ``b``, captured on the static buffers."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        self._forward(b)                           # warm-up: compiles the kernels
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b)
        return graph, out
