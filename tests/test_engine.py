"""The engine against transformers: greedy tokens identical and logits within 1e-5 (fp32) for
tiny random Llama, Qwen2 and Qwen3 models, several prompts of different lengths in one batch,
through chunked prefill, preemption by swap and by recompute, compaction at window ends,
every memory policy, and the kernels both under Triton's interpreter and as the torch
fallback. The models are built with a large init (0.2) and random norm weights and biases:
with flat logits, dropped positions or a missing context token would still match."""
from __future__ import annotations

import functools
import sys

import pytest
import torch

from engine import LLM, SamplingParams
from scheduler import PlannerConfig

PROMPTS = [[5, 17, 42, 9, 100], [3, 3, 7, 200, 11, 11, 12, 50, 1, 99, 98, 2], list(range(30, 50)),
           [77]]
MAX_TOKENS = 6
# A host arena with 4 KiB chunks: 2 blocks of 4 tokens for the tiny models' 512 B/token.
SMALL = dict(block_size=4, arena_granularity=4096)


@pytest.fixture
def torch_kernels(monkeypatch):
    """Every kernel as its documented torch fallback (fast). Tests without this fixture run
    the Triton kernels (under the interpreter on a CPU-only machine)."""
    from kernels import _runtime
    monkeypatch.setattr(_runtime, "use_triton", lambda *t: False)


def tiny_hf(family: str = "llama", *, seed: int = 0, tie: bool | None = None, **overrides):
    """A tiny random transformers model (fp32, eval) with a large init and random norm
    weights and biases, no EOS (generate runs to max_new_tokens)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                  max_position_embeddings=256, eos_token_id=None, bos_token_id=None,
                  pad_token_id=None)
    if family == "llama":   # llama3 rope scaling that bites at these positions
        common.update(tie_word_embeddings=False, rope_theta=5000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32))
        cls, cfg_cls = transformers.LlamaForCausalLM, transformers.LlamaConfig
    elif family == "qwen2":
        common.update(tie_word_embeddings=True)
        cls, cfg_cls = transformers.Qwen2ForCausalLM, transformers.Qwen2Config
    elif family == "qwen3":   # head_dim is its own field: 32, not hidden / heads = 16
        common.update(tie_word_embeddings=True, head_dim=32)
        cls, cfg_cls = transformers.Qwen3ForCausalLM, transformers.Qwen3Config
    else:
        raise ValueError(family)
    if tie is not None:
        common["tie_word_embeddings"] = tie
    common.update(overrides)
    model = cls(cfg_cls(**common)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
    return model


def to_dtype(model, dtype: torch.dtype):
    """``model.to(dtype)`` keeping the RoPE frequency buffer in fp32 (``.to`` would cast it,
    and an fp16 frequency table changes tokens: the pitfall the engine avoids)."""
    inv = model.model.rotary_emb.inv_freq.clone()
    model = model.to(dtype)
    model.model.rotary_emb.inv_freq = inv
    return model


@functools.lru_cache(maxsize=None)
def cached_hf(family: str, dtype: torch.dtype = torch.float32):
    return to_dtype(tiny_hf(family), dtype)


def hf_greedy(model, prompt: list[int], n: int = MAX_TOKENS) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens (generate, do_sample=False) and their fp32 logits."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), torch.stack([x[0] for x in out.logits]).float()


@functools.lru_cache(maxsize=None)
def reference(family: str, dtype: torch.dtype = torch.float32, n: int = MAX_TOKENS):
    model = cached_hf(family, dtype)
    return [hf_greedy(model, p, n) for p in PROMPTS]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Max abs difference within ``rel`` of the logits' magnitude (fp32)."""
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"logits differ by {err:.3g} (scale {scale:.3g})"


def run_engine(family: str, **kwargs) -> tuple[LLM, list]:
    max_tokens = kwargs.pop("max_tokens", MAX_TOKENS)
    llm = LLM(cached_hf(family), **kwargs)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                return_logits=True)
                        if isinstance(max_tokens, int) else
                        [SamplingParams(max_tokens=m, ignore_eos=True, return_logits=True)
                         for m in max_tokens])
    return llm, outs


def check_identical(family: str, outs, n: int | list[int] = MAX_TOKENS) -> None:
    ref = reference(family)
    for i, (o, (tokens, logits)) in enumerate(zip(outs, ref)):
        k = n if isinstance(n, int) else n[i]
        assert o.token_ids == tokens[:k], f"prompt {i}"
        assert_logits_close(o.logits, logits[:k])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_tokens_and_logits_match_transformers(family):
    """Triton kernels (the interpreter on CPU)."""
    llm, outs = run_engine(family, block_size=4)
    check_identical(family, outs)
    assert [len(o.prompt_token_ids) for o in outs] == [len(p) for p in PROMPTS]
    assert llm.loop.metrics.counters.finished == len(PROMPTS)


def test_chunked_prefill_gives_every_token_its_absolute_position(monkeypatch):
    """A token budget of 7 splits the 12- and 20-token prompts over several steps, packed
    with other sequences' chunks and decode rows."""
    llm = LLM(cached_hf("qwen3"), block_size=4, max_num_batched_tokens=7)
    seen = []
    meta = llm.step.metadata

    def record(batch):
        seen.append((batch.num_tokens.copy(), batch.is_prefill.copy(), batch.positions.copy()))
        return meta(batch)

    monkeypatch.setattr(llm.step, "metadata", record)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True,
                                                return_logits=True))
    check_identical("qwen3", outs)
    chunks_mid_prompt = [pos for n, pre, pos in seen if pre.any() and pos.min() > 0]
    assert chunks_mid_prompt, "no prompt chunk started past position 0"
    assert any(pre.any() and (~pre).any() for n, pre, pos in seen), "no mixed step"
    assert max(int(n.sum()) for n, _, _ in seen) <= 7


@pytest.mark.parametrize("preemption, kernels_on", [("swap", "triton"), ("recompute", "torch"),
                                                    ("swap", "torch")])
def test_preemption_mid_decode_resumes_identically(preemption, kernels_on, request):
    """Four prompts need 14 blocks by the end; the cap holds 8 (4 chunks of 2 blocks):
    decoding requests are preempted and come back by swap-in or by re-prefilling the
    prompt and the tokens generated so far."""
    if kernels_on == "torch":
        request.getfixturevalue("torch_kernels")
    llm, outs = run_engine("llama", memory_policy="on-demand", preemption=preemption,
                           kv_cache_memory_bytes=4 * 4096, **SMALL)
    c = llm.loop.metrics.counters
    assert (c.preemptions_swap if preemption == "swap" else c.preemptions_recompute) > 0
    check_identical("llama", outs)


def test_window_end_compaction_moves_live_blocks_mid_generation():
    """Windowed memory with requests of different lengths: at window ends the arena moves
    blocks of running requests to lower ids and unmaps the top; decoding reads them there."""
    lens = [2, 6, 3, 6]
    llm, outs = run_engine("qwen2", memory_policy="windowed", max_tokens=lens,
                           planner=PlannerConfig(min_decode_steps=1, max_decode_steps=2,
                                                 arrival_reserve_s=0.0, shrink_min_blocks=1),
                           **SMALL)
    assert llm.arena.stats()["moves"] > 0, "no live block was moved"
    check_identical("qwen2", outs, lens)


@pytest.mark.parametrize("policy", ["static", "on-demand", "windowed"])
def test_each_memory_policy(policy, torch_kernels):
    llm, outs = run_engine("llama", memory_policy=policy, max_num_seqs=3, **SMALL)
    check_identical("llama", outs)


@pytest.mark.parametrize("policy", ["on-demand", "windowed"])
def test_background_mapper_thread_changes_no_token(policy, torch_kernels):
    """A mapper thread maps and unmaps chunks while the model steps: same tokens and
    logits, and the mapper did work."""
    llm, outs = run_engine("llama", memory_policy=policy, max_num_seqs=3,
                           background_mapper=True, **SMALL)
    c = llm.loop.metrics.counters
    llm.close()
    assert c.time_background_s > 0 and c.background_maps > 0
    check_identical("llama", outs)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_torch_fallback_kernels(family, torch_kernels, monkeypatch):
    """The same identity with every kernel as its documented torch fallback."""
    ref = sys.modules["kernels.reference"]
    calls = []
    real = ref.paged_decode_attention_ref
    monkeypatch.setattr(ref, "paged_decode_attention_ref",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    llm, outs = run_engine(family, block_size=4)
    assert calls, "the decode fallback never ran"
    check_identical(family, outs)


def test_negative_control_wrong_positions_fail(monkeypatch, torch_kernels):
    """Shift every decode position by one: the logits comparison must catch it."""
    llm = LLM(cached_hf("llama"), block_size=4)
    meta = llm.step.metadata

    def shifted(batch):
        ids, m = meta(batch)
        if m.decode_only:
            m.positions = m.positions + 1
        return ids, m

    monkeypatch.setattr(llm.step, "metadata", shifted)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True,
                                                return_logits=True))
    with pytest.raises(AssertionError):
        check_identical("llama", outs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_up_to_ties(dtype, torch_kernels):
    """fp16/bf16: tokens equal until a step where transformers' own top logits are (nearly)
    tied; there our token must be one of the tied ones."""
    ref = reference("qwen3", dtype)
    llm = LLM(cached_hf("qwen3", dtype), block_size=4)
    assert llm.model.dtype == dtype
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    eps = torch.finfo(dtype).eps
    matched = 0
    for o, (tokens, logits) in zip(outs, ref):
        for t, (a, b) in enumerate(zip(o.token_ids, tokens)):
            if a != b:
                row = logits[t]
                gap = (row[b] - row[a]).item()
                assert 0 <= gap <= 4 * eps * row.abs().max().item(), \
                    f"step {t}: ours {a}, theirs {b}, gap {gap}"
                break
            matched += 1
    assert matched >= len(PROMPTS) * MAX_TOKENS // 2


def test_sampling_is_seeded_per_request_and_top_p_narrows_to_greedy(torch_kernels):
    llm = LLM(cached_hf("llama"), block_size=4)
    sp = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True, seed=123)
    alone = llm.generate([PROMPTS[1]], sp)[0].token_ids
    batched = llm.generate(PROMPTS, [SamplingParams(max_tokens=6, temperature=1.0,
                                                    ignore_eos=True, seed=7)] * 4)
    again = llm.generate([PROMPTS[0], PROMPTS[1]], [SamplingParams(max_tokens=6, seed=7,
                                                                   temperature=1.0,
                                                                   ignore_eos=True), sp])
    assert again[1].token_ids == alone          # independent of the batch it ran in
    assert again[0].token_ids == batched[0].token_ids
    other = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=6, temperature=1.0,
                                                      ignore_eos=True, seed=124))[0]
    greedy = reference("llama")[1][0][:6]
    assert alone != greedy or other.token_ids != greedy   # sampling does sample
    narrow = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=6, temperature=1.0,
                                                       top_p=1e-6, ignore_eos=True))[0]
    assert narrow.token_ids == greedy


def test_eos_ends_a_request_unless_ignored(torch_kernels):
    hf = tiny_hf("llama")
    tokens = reference("llama")[2][0]
    eos = tokens[3]
    hf.config.eos_token_id = eos
    llm = LLM(hf, block_size=4)
    stop, keep = llm.generate([PROMPTS[2], PROMPTS[2]],
                              [SamplingParams(max_tokens=MAX_TOKENS),
                               SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)])
    first = tokens.index(eos)
    assert stop.token_ids == tokens[:first + 1] and stop.finish_reason == "stop"
    assert keep.token_ids == tokens and keep.finish_reason == "length"
    assert llm.loop.idle


def test_bad_input_is_refused_before_anything_is_queued():
    llm = LLM(cached_hf("llama"), block_size=4, max_model_len=32)
    for prompts, sp, word in [([[1, 2], []], None, "prompt_token_ids"),
                              ([[1, 2], [300]], None, "prompt_token_ids"),
                              ([[1] * 30], SamplingParams(max_tokens=8), "max_model_len"),
                              ([[1]], [SamplingParams(), SamplingParams()], "sampling_params")]:
        with pytest.raises(ValueError, match=word):
            llm.generate(prompts, sp)
        assert llm.loop.idle and not llm.step.seqs
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    for kw, word in [(dict(memory_policy="lazy"), "memory"), (dict(block_size=0), "block_size"),
                     (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
                     (dict(kv_cache_memory_bytes=-1), "kv_cache_memory_bytes"),
                     (dict(dtype="int8"), "dtype"), (dict(device="mps"), "device"),
                     (dict(max_model_len=0), "max_model_len"),
                     (dict(max_model_len=10 ** 9), "max_position_embeddings"),
                     (dict(planner=PlannerConfig()), "planner")]:
        with pytest.raises(ValueError, match=word):
            LLM(cached_hf("llama"), **kw)
    with pytest.raises(ValueError, match="stop_after"):
        llm.add_request([1, 2], SamplingParams(), stop_after=0)
    assert llm.loop.idle and not llm.step.seqs
    # The device's mappable memory shrank after start-up (on CUDA: other processes): the
    # second prompt no longer fits, and the first must not be left queued either.
    blocks = llm.arena.spec.blocks_for
    llm.loop.limit_blocks = lambda: blocks(8 + 4 - 1)
    with pytest.raises(ValueError, match="cannot fit"):
        llm.generate([[1] * 8, [1] * 20], SamplingParams(max_tokens=4))
    assert llm.loop.idle and not llm.step.seqs
    del llm.loop.limit_blocks
    # A ready CausalLM is used as is: a dtype or device it does not have is refused.
    model = llm.model
    with pytest.raises(ValueError, match="dtype"):
        LLM(model, dtype="float16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            LLM(model, device="cuda")


def test_decode_graph_buffers_pad_and_bucket_correctly(torch_kernels):
    """The CUDA-graph path's static buffers, padding rows (slot -1, one token of a mapped
    block) and buckets, with capture replaced by re-running the forward on those buffers
    (what a replay does): tokens and logits stay identical. Real capture: test_engine_gpu."""
    from engine.cuda_graphs import DecodeGraphs

    class Replay:
        def __init__(self, fn):
            self.replay = fn

    class EagerGraphs(DecodeGraphs):
        sizes = []

        def capture(self, b):
            out = self._forward(b)
            return Replay(lambda: out.copy_(self._forward(b))), out

        def run(self, ids, meta):
            self.sizes.append(ids.shape[0])
            return super().run(ids, meta)

    llm = LLM(cached_hf("llama"), block_size=4, max_num_seqs=6)
    llm.step.graphs = graphs = EagerGraphs(llm.model, llm.arena, 6)
    assert graphs.buckets == [1, 2, 4, 6]
    outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=m, ignore_eos=True,
                                                 return_logits=True) for m in (2, 6, 3, 6)])
    assert 3 in graphs.sizes and 4 in graphs.graphs   # 3 sequences padded to bucket 4
    check_identical("llama", outs, [2, 6, 3, 6])
