"""LLM: the offline entry point (vLLM's names), on the scheduler's loop and the arena.

    from engine import LLM, SamplingParams
    llm = LLM("/path/to/Llama-3.2-1B", device="cuda", memory_policy="windowed")
    outs = llm.generate([[128000, 791, 6864]], SamplingParams(max_tokens=32))
    outs[0].token_ids

The engine adds a model and its step (:mod:`engine.step`) to :class:`scheduler.EngineLoop`,
which forms batches (chunked prefill), maps and returns memory by policy, preempts (swap or
recompute) and compacts; there is no second scheduler here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence as Seq

import torch

from arena import KVSpec, PagedArena
from scheduler import DeviceSpec, EngineLoop, LatencyModel, LoopConfig, ModelShape, Request

from .sampling import SamplingParams
from .step import ModelStep, Sequence
from .weights import load_model


@dataclass
class RequestOutput:
    """One prompt's result: ``token_ids`` (generated tokens only), ``prompt_token_ids``,
    ``finish_reason`` ("length" or "stop"), and ``logits`` (fp32 ``[len(token_ids),
    vocab]`` when the params asked for them, else None)."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    logits: torch.Tensor | None = None


def _latency_prior(model, kv_bytes: int) -> LatencyModel:
    """A cold-start latency model from the model's size and a rough device figure; the
    loop refits it online from measured step durations."""
    cfg = model.cfg
    shape = ModelShape("engine", cfg.num_layers, cfg.hidden_size, cfg.num_heads,
                       cfg.num_kv_heads, cfg.head_dim, float(cfg.num_params),
                       model.dtype.itemsize)
    if model.device.type == "cuda":
        dev = DeviceSpec("cuda", torch.cuda.get_device_properties(model.device).total_memory,
                         3e12, 600e12)
    else:
        dev = DeviceSpec("cpu", max(kv_bytes, 1), 20e9, 2e11)
    return LatencyModel.from_hardware(shape, dev)


class LLM:
    """An engine over one model and one :class:`arena.PagedArena`.

    Args (vLLM's names where they exist):
        model: a transformers ``PreTrainedModel``, a local folder (config.json +
            *.safetensors), a preset ``"NAME:random"``, or an :class:`engine.model.CausalLM`.
        device: "cpu" or "cuda"/"cuda:N".
        block_size: tokens per KV block. max_num_seqs: sequences running at once.
        max_num_batched_tokens: tokens per model step (prompt chunks beyond it are split).
        dtype: "auto", "float32", "float16", "bfloat16" (or a torch dtype).
        seed: random weights of presets, and the default sampling seeds.
        memory_policy: "static", "on-demand" or "windowed". predictor: remaining-length
            predictor of "windowed" ("max_tokens", "empirical", "oracle", or an object;
            "oracle" knows only ``stop_after`` of :meth:`add_request` — a trace's true
            length — and otherwise sees ``max_tokens``, since no engine knows when EOS comes).
        kv_cache_memory_bytes: the KV arena's reserved range and every policy's cap
            (default: 90% of free device memory on CUDA, 256 MiB on the CPU).
        max_model_len: longest prompt + output (default: the config's
            max_position_embeddings, capped by what the KV memory holds).
        preemption: "auto", "swap" or "recompute". planner: a
            :class:`scheduler.PlannerConfig` for "windowed". arena_granularity: chunk
            granularity of the host (CPU) arena in bytes (small values make tests map,
            unmap and compact often). cuda_graphs: capture decode steps (CUDA only).
        background_mapper: map ahead of need and unmap on a separate thread
            (:class:`arena.BackgroundMapper`), so a step of an elastic policy waits on the
            driver only when a block was not mapped ahead (``static`` maps once and gives
            it nothing to do). Untested on a GPU: a decode graph captured while the
            mapper unmaps may be invalidated.
    """

    def __init__(self, model: Any, device: str | torch.device = "cpu", *, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 dtype: Any = "auto", seed: int = 0, memory_policy: str = "static",
                 predictor: Any = "empirical", kv_cache_memory_bytes: int | None = None,
                 max_model_len: int | None = None, preemption: str = "auto", planner=None,
                 arena_granularity: int | None = None, cuda_graphs: bool = True,
                 background_mapper: bool = False) -> None:
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {str(device)!r}")
        for name, v in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens),
                        ("max_model_len", 1 if max_model_len is None else max_model_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if planner is not None and memory_policy != "windowed":
            raise ValueError(f"planner is used by memory_policy='windowed' only, got "
                             f"memory_policy={memory_policy!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        # Checked before anything is built (the arena holds device memory).
        config = LoopConfig(memory=memory_policy, predictor=predictor,
                            token_budget=max_num_batched_tokens, max_running=max_num_seqs,
                            preemption=preemption, planner=planner,
                            mapper="thread" if background_mapper else "off")
        if kv_cache_memory_bytes is not None and (
                isinstance(kv_cache_memory_bytes, bool)
                or not isinstance(kv_cache_memory_bytes, int) or kv_cache_memory_bytes <= 0):
            raise ValueError(f"kv_cache_memory_bytes must be a positive int, got "
                             f"{kv_cache_memory_bytes!r}")
        self.model = load_model(model, dtype=dtype, device=device, seed=seed)
        cfg = self.model.cfg
        self.seed, self.device = seed, device
        spec = KVSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size=block_size,
                      dtype=self.model.dtype)
        if kv_cache_memory_bytes is None:   # what the weights left
            kv_cache_memory_bytes = (int(torch.cuda.mem_get_info(device)[0] * 0.9)
                                     if device.type == "cuda" else 256 << 20)
        if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings,
                                 kv_cache_memory_bytes // spec.token_bytes)
        if self.max_model_len < 1:
            raise ValueError(f"kv_cache_memory_bytes={kv_cache_memory_bytes} holds no token")
        gran = arena_granularity if device.type == "cpu" else None
        self.arena = PagedArena(spec, kv_cache_memory_bytes, device, max_seqs=max_num_seqs,
                                max_blocks_per_seq=spec.blocks_for(self.max_model_len),
                                granularity=gran)
        # whole chunks only: what the arena can really hold for one sequence
        self.max_model_len = min(self.max_model_len, self.arena.capacity_blocks * block_size)
        try:
            graphs = None
            if cuda_graphs and device.type == "cuda":
                from .cuda_graphs import DecodeGraphs
                graphs = DecodeGraphs(self.model, self.arena, max_num_seqs)
            self.step = ModelStep(self.model, self.arena, cfg.eos_token_ids, graphs)
            self.loop = EngineLoop(self.arena, self.step,
                                   _latency_prior(self.model, kv_cache_memory_bytes), config)
        except BaseException:
            self.arena.close()
            raise
        self._next_id = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: Seq[int], params: SamplingParams, *,
                    arrival_s: float | None = None, stop_after: int | None = None) -> int:
        """Queue one prompt; returns its request id. ``arrival_s``: on the loop's clock
        (default now). ``stop_after``: end after this many tokens as if EOS came then
        (trace replay, where the true output length is known); default ``max_tokens``."""
        ids = self._check(prompt_token_ids, params)
        if stop_after is not None and (isinstance(stop_after, bool)
                                       or not isinstance(stop_after, int) or stop_after < 1):
            raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
        rid = self._next_id
        req = Request(rid, len(ids), params.max_tokens, stop_after or params.max_tokens,
                      arrival_s=self.loop.now if arrival_s is None else float(arrival_s))
        seed = params.seed if params.seed is not None else self.seed + rid
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(self.device).manual_seed(seed)
        self.loop.submit(req)       # raises (nothing queued) if it can never fit
        self.step.seqs[rid] = Sequence(req, ids, len(ids), params, gen)
        self._next_id += 1
        return rid

    def _check(self, prompt_token_ids, params) -> list[int]:
        """The prompt as a list of ints; ValueError/TypeError naming what is wrong."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got "
                            f"{type(params).__name__}")
        if not isinstance(prompt_token_ids, (list, tuple)):
            raise TypeError("prompt_token_ids: each prompt must be a list of token ids")
        ids = [int(t) for t in prompt_token_ids]
        vocab = self.model.cfg.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt_token_ids must be non-empty token ids in [0, {vocab})")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt_token_ids: {len(ids)} tokens + max_tokens "
                             f"{params.max_tokens} exceed max_model_len={self.max_model_len}")
        # The loop's own admission test, asked here so generate() can check every prompt
        # before queuing any (the device's free memory may have shrunk since start-up).
        if self.arena.spec.blocks_for(len(ids) + params.max_tokens - 1) > self.loop.limit_blocks():
            raise ValueError(f"prompt_token_ids: {len(ids)} tokens + max_tokens "
                             f"{params.max_tokens} cannot fit in the KV memory the device can "
                             f"map now ({self.loop.limit_blocks()} blocks)")
        return ids

    def output(self, rid: int) -> RequestOutput:
        """The result of request ``rid`` (its tokens so far if it has not finished)."""
        s = self.step.seqs[rid]
        out = s.output_ids
        reason = "stop" if out and out[-1] in self.step.eos and not s.params.ignore_eos \
            else "length"
        return RequestOutput(rid, s.token_ids[:s.prompt_len], out, reason,
                             torch.stack(s.logits) if s.logits else None)

    def generate(self, prompt_token_ids: Seq[Seq[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt (token ids) and return outputs in prompt order.
        ``sampling_params``: one for all prompts or one per prompt (default
        ``SamplingParams()``). Every prompt is checked before any is queued."""
        prompts = list(prompt_token_ids)
        if not prompts:
            raise ValueError("prompt_token_ids must be a non-empty list of token-id lists")
        sps = sampling_params if sampling_params is not None else SamplingParams()
        sps = [sps] * len(prompts) if isinstance(sps, SamplingParams) else list(sps)
        if len(sps) != len(prompts):
            raise ValueError(f"sampling_params has {len(sps)} entries for {len(prompts)} prompts")
        for p, sp in zip(prompts, sps):   # validate all first: nothing queued on bad input
            self._check(p, sp)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, sps)]
        self.loop.run()
        outs = [self.output(r) for r in rids]
        for r in rids:
            del self.step.seqs[r]
        return outs

    def close(self) -> None:
        """Stop the background mapper, if any, and return the arena's device memory."""
        try:
            self.loop.metered.close_mapper()
        finally:
            self.arena.close()
