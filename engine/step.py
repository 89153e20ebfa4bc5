"""The model step: what :class:`scheduler.EngineLoop` calls with each batch it forms.

This is the seam between a model and the arena, and the example of how to plug the arena
into an engine of one's own. The loop owns requests, blocks and block tables; a
:class:`~scheduler.loop.Batch` says, per token, its position and the slot its K/V go to,
and per sequence its block-table row and context length. The step turns that into device
tensors, runs the model (which writes K/V into ``arena.kv_cache(layer)`` and attends
through the paged kernels), samples a token for every sequence whose whole context is now
cached, and returns the measured duration, which the loop's latency model learns from.

A request that samples one of the model's EOS tokens ends by setting its
``Request.output_tokens`` to the count it reaches this step: the loop finishes it when it
accounts the step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .model import AttentionMetadata, CausalLM
from .sampling import SamplingParams, sample


@dataclass
class Sequence:
    """A request's tokens (prompt then generated) and how to sample it."""

    request: object                  # scheduler.Request
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator | None
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]


class ModelStep:
    """``(Batch) -> seconds``: a forward pass of ``model`` over the batch on ``arena``.

    ``seqs`` maps request id -> :class:`Sequence` (filled by the engine before submission).
    ``eos_token_ids``: tokens that end a request unless its params ignore EOS. On CUDA,
    decode-only batches replay CUDA graphs when ``graphs`` is a
    :class:`engine.cuda_graphs.DecodeGraphs` (else run eagerly).
    """

    def __init__(self, model: CausalLM, arena, eos_token_ids=(), graphs=None) -> None:
        self.model, self.arena = model, arena
        self.device = model.device
        self.seqs: dict[int, Sequence] = {}
        self.eos = frozenset(eos_token_ids)
        self.graphs = graphs
        self.steps = 0

    def metadata(self, batch) -> tuple[torch.Tensor, AttentionMetadata]:
        """Device input ids ``[T]`` and :class:`AttentionMetadata` for ``batch``. Token ``j``
        of sequence ``i`` is the token at its own absolute position (chunked prefill and
        recompute included): ``token_ids[positions[j]]``."""
        ids = np.empty(batch.positions.shape[0], dtype=np.int64)
        qsl = batch.query_start_loc
        for i, rid in enumerate(batch.req_ids.tolist()):
            a, b = int(qsl[i]), int(qsl[i + 1])
            tokens = self.seqs[rid].token_ids
            ctx = int(batch.context_lens[i])
            ids[a:b] = tokens[ctx - (b - a):ctx]
        dev = self.device
        rows = torch.from_numpy(batch.block_table_rows.astype(np.int64)).to(dev)
        width = -(-int(batch.context_lens.max()) // self.arena.spec.block_size)
        meta = AttentionMetadata(
            positions=torch.from_numpy(batch.positions).to(dev),
            slot_mapping=torch.from_numpy(batch.slot_mapping).to(dev),
            block_tables=self.arena.tables.device_table[rows, :width],
            seq_lens=torch.from_numpy(batch.context_lens).to(dev),
            query_start_loc=torch.from_numpy(batch.query_start_loc).to(dev),
            decode_only=not bool(batch.is_prefill.any()))
        return torch.from_numpy(ids).to(dev), meta

    def __call__(self, batch) -> float:
        """Run ``batch``; append sampled tokens; return the step's duration in seconds
        (CUDA events on a GPU, wall clock on the CPU)."""
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        ids, meta = self.metadata(batch)
        # A sequence samples when its whole known context is cached after this step.
        seqs = [self.seqs[r] for r in batch.req_ids.tolist()]
        ctx = batch.context_lens.tolist()
        rows = [i for i, s in enumerate(seqs) if ctx[i] == len(s.token_ids)]
        last = batch.query_start_loc[1:][rows].astype(np.int64) - 1
        with torch.inference_mode():
            if meta.decode_only and self.graphs is not None:
                logits = self.graphs.run(ids, meta)[torch.from_numpy(last).to(self.device)]
            else:
                hidden = self.model.forward(ids, meta, self.arena.kv_cache)
                logits = self.model.logits(hidden[torch.from_numpy(last).to(self.device)])
            chosen = [seqs[i] for i in rows]
            tokens = sample(logits, [s.params for s in chosen], [s.generator for s in chosen])
        for k, (s, tok) in enumerate(zip(chosen, tokens)):
            s.token_ids.append(tok)
            if s.params.return_logits:
                s.logits.append(logits[k].cpu())
            if tok in self.eos and not s.params.ignore_eos:
                # generated counts this step's token only once the loop accounts the step
                s.request.output_tokens = s.request.generated + 1
        self.steps += 1
        if cuda:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return time.perf_counter() - t0
