"""The engine on a GPU: CUDA-graph decode equals the eager path (tokens and logits) and
transformers, through windowed memory with compaction; bf16 at a real geometry runs."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from scheduler import PlannerConfig
from tests.test_engine import PROMPTS, assert_logits_close, reference, tiny_hf

pytestmark = pytest.mark.gpu


def _generate(graphs: bool, **kw):
    llm = LLM(tiny_hf("qwen3"), "cuda", block_size=4, cuda_graphs=graphs, **kw)
    outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=m, ignore_eos=True,
                                                 return_logits=True) for m in (2, 8, 3, 8)])
    return llm, outs


def test_cuda_graph_decode_matches_eager_and_transformers():
    pytest.importorskip("transformers")   # lent GPU machines may lack it (CPU CI has it)
    kw = dict(memory_policy="windowed", kv_cache_memory_bytes=64 << 20,
              planner=PlannerConfig(min_decode_steps=1, max_decode_steps=2,
                                    arrival_reserve_s=0.0, shrink_min_blocks=1))
    llm_g, graphed = _generate(True, **kw)
    assert llm_g.step.graphs is not None and llm_g.step.graphs.graphs, "no graph was captured"
    _, eager = _generate(False, **kw)
    ref = reference("qwen3")
    for g, e, (tokens, logits) in zip(graphed, eager, ref):
        assert g.token_ids == e.token_ids == tokens[:len(g.token_ids)]
        assert_logits_close(g.logits, e.logits.to(g.logits.device))
        assert_logits_close(g.logits, logits[:len(g.token_ids)])


def test_real_geometry_bf16_runs_with_graphs():
    llm = LLM("llama-3-8b:random", "cuda", max_num_seqs=8, kv_cache_memory_bytes=4 << 30)
    assert llm.model.dtype == torch.bfloat16
    outs = llm.generate([[1] * 100, list(range(1000, 1333))],
                        SamplingParams(max_tokens=16, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [16, 16]
    assert llm.step.graphs.graphs
