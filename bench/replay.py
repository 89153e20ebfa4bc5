"""Trace replay: run a request trace through the real scheduler and arena under each memory
policy and compare what they map.

    python -m bench.replay                      # embedded Azure slice, every policy
    kv-replay --trace azure_conv_2023 --policy static --policy windowed --predictor empirical

Each policy gets a fresh :class:`arena.PagedArena` and :class:`scheduler.EngineLoop` on the
same trace, the same model and the same device memory:

- ``static``: maps the whole KV budget at start and never gives it back (vLLM, SGLang);
- ``on-demand``: maps a chunk when a block is needed and unmaps chunks that hold no block,
  without compaction or prediction (virtual-memory KV caches such as vAttention);
- ``windowed:<predictor>``: this library's window planner with a remaining-length predictor
  (``max_tokens``, ``empirical``, ``oracle``).

Without a GPU the arena runs on the host backend with the named model's real KV geometry
(so mapped bytes are that model's real figures; the step model writes no KV, and untouched
pages of the anonymous mapping cost no memory; for the same reason compaction rewrites the
block tables without copying block bytes unless ``--copy-kv-bytes``). Model steps take the
time a simulated GPU gives (:class:`bench.step_truth.StepTruth`: a roofline per kernel class
with sourced efficiencies, a multiplicative ``--step-bias`` and seeded lognormal jitter
``--step-noise``), while the loop plans with its own :class:`scheduler.LatencyModel`,
cold-started from :meth:`~scheduler.LatencyModel.from_hardware` and fitted online, so its
prediction error is real and reported per policy (``info.latency_prediction`` in
replay.json). Map/unmap/compaction are charged a modeled GPU cost
(:class:`scheduler.costs.ModeledGPUCost`): per-chunk map/unmap figures measured on the named
device when ``bench/results/`` holds them (:mod:`bench.measured_costs`), assumed constants
otherwise; the source is printed with the results. With CUDA the arena maps real device
memory and arena operations are charged their measured wall-clock time.

Memory budget (bytes): ``device_limit = device memory - weights - activation reserve``
(what the device has for KV); every policy is capped at ``kv_budget = device memory x
utilization - weights - activation reserve``, which the static policy maps at start (the
"fraction of free memory" an engine like vLLM reserves, ``--memory-utilization``).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from arena.block_tables import remap_block_ids
from bench import cli_checks, report
from bench.kernel_warmup import warm_up_compaction
from bench.measured_costs import RESULTS_ROOT, find_measured_arena_cost
from scheduler.memory import MEMORY_POLICIES as _MEMORY_REGISTRY
from scheduler.policies import PREEMPTION_MODES as _PREEMPTION_REGISTRY
from scheduler.predictor import PREDICTORS as _PREDICTOR_REGISTRY
from bench.traces import Trace, load_trace

GIB = 1 << 30
# Policy names come from the scheduler's registries (declared once there).
PREDICTORS = _PREDICTOR_REGISTRY.names
PREEMPTION_MODES = _PREEMPTION_REGISTRY.names
#: memory policies run without a predictor, and the one that takes one
REACTIVE = tuple(n for n in _MEMORY_REGISTRY.names if n != "windowed")
ALL_POLICIES = REACTIVE + tuple(f"windowed:{p}" for p in PREDICTORS)
#: Copy bandwidth as a share of peak HBM bandwidth for modeled compaction (a device-to-
#: device ``copy_`` reaches roughly 75-85% of peak on H100-class HBM; bench._common's
#: copy_bandwidth measures it on a GPU).
COPY_EFFICIENCY = 0.8
#: Score the planner's step-time prediction on every 8th step (after the first 32): a few
#: thousand samples per replay, without refitting its latency model on every step.
SCORE_EVERY = 8


def _models() -> dict:
    """Model presets: the scheduler's, plus ``tiny`` (a 2-layer toy for quick tests)."""
    from scheduler.latency import MODELS, ModelShape

    return {**MODELS, "tiny": ModelShape("tiny", 2, 256, 4, 2, 64, 20e6)}


def _devices() -> dict:
    from scheduler.latency import DEVICES

    return dict(DEVICES)


# ------------------------------------------------------------------------------ set-up
@dataclass
class ReplaySetup:
    """Everything a policy run shares (sizes in bytes, times in seconds)."""

    model: Any                      # scheduler.latency.ModelShape
    device: Any                     # scheduler.latency.DeviceSpec (memory may be overridden)
    arena_device: str               # "cpu" (host backend) or "cuda"
    block_size: int
    device_memory_bytes: int
    weights_bytes: int
    activation_reserve_bytes: int
    memory_utilization: float
    device_limit_bytes: int
    kv_budget_bytes: int
    max_tokens: int
    token_budget: int
    max_running: int
    preemption: str
    kv_spec: Any = field(repr=False, default=None)
    #: host replays skip copying block bytes in compaction (see remap_tables_only)
    copy_free_compaction: bool = True
    #: the KV budget was given (--kv-budget-gib) rather than derived
    kv_budget_set: bool = False
    #: background mapper of the elastic policies (scheduler.metered.MAPPER_MODES; "inline"
    #: models a mapper thread on the host, "thread" runs one) and its prefetch quantile
    mapper: str = "inline"
    prefetch_quantile: float = 0.9
    #: the simulated GPU's step times: multiplicative bias, lognormal jitter sigma, seed
    step_bias: float = 1.0
    step_noise: float = 0.03
    seed: int = 0
    #: map/unmap seconds per chunk measured on this device (bench.measured_costs), or None
    measured_arena_cost: Any = None

    def step_truth(self):
        """The simulated GPU (:class:`bench.step_truth.StepTruth`) every policy's steps take
        their durations from."""
        from bench.step_truth import StepTruth

        return StepTruth(self.model, self.device, bias=self.step_bias,
                         noise_sigma=self.step_noise, seed=self.seed)

    def describe(self) -> dict:
        """The set-up as a JSON-ready dict (GiB and the latency/cost assumptions)."""
        from scheduler.latency import LatencyModel

        lat = LatencyModel.from_hardware(self.model, self.device)
        c = lat.coef
        m = self.model
        return {
            "model": {"name": m.name, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
                      "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
                      "head_dim": m.head_dim, "num_params": m.num_params,
                      "dtype_bytes": m.dtype_bytes,
                      "kv_bytes_per_token": m.kv_bytes_per_token},
            "device": {"name": self.device.name, "memory_gib": self.device_memory_bytes / GIB,
                       "hbm_bandwidth_TBps": self.device.hbm_bandwidth / 1e12,
                       "fp16_TFLOPs": self.device.fp16_flops / 1e12},
            "arena_backend": "host (mmap, simulated device)" if self.arena_device == "cpu"
            else "cuda (virtual memory management)",
            "block_size": self.block_size,
            "block_bytes": self.kv_spec.block_bytes,
            "weights_gib": self.weights_bytes / GIB,
            "activation_reserve_gib": self.activation_reserve_bytes / GIB,
            "memory_utilization": self.memory_utilization,
            "device_limit_gib": self.device_limit_bytes / GIB,
            "kv_budget_gib": self.kv_budget_bytes / GIB,
            "kv_budget_set": self.kv_budget_set,
            "max_tokens": self.max_tokens, "token_budget": self.token_budget,
            "max_running": self.max_running, "preemption": self.preemption,
            "background_mapper": {"mode": self.loop_mapper(),
                                  "prefetch_quantile": self.prefetch_quantile},
            # what the planner starts from (fitted online to the step_truth's durations)
            "latency_model": {
                "source": "scheduler.LatencyModel.from_hardware (roofline, 60% of peak, "
                          "2 ms step overhead)",
                "role": "the planner's cold-start prior, refitted online from observed "
                        "steps; deliberately not the simulated truth",
                "coefficients": dict(zip(("step_s", "per_prefill_token_s",
                                          "per_attn_pair_s", "per_decode_seq_s",
                                          "per_decode_context_token_s"), c.tolist())),
                "decode_step_1seq_1k_ctx_ms": lat.decode_time(1, 1024) * 1e3,
                "decode_step_32seq_32k_ctx_ms": lat.decode_time(32, 32 * 1024) * 1e3,
                "prefill_1k_tokens_ms": lat.prefill_time(1024, 1024 * 1025 / 2) * 1e3,
            },
            # what the steps really take (a simulated GPU, also next to a CUDA arena: the
            # replay runs no forward pass)
            "step_truth": self.step_truth().describe(),
            "arena_cost_model": self.cost_describe(),
            "compaction_on_host": ("block tables rewritten, block bytes not copied (no KV "
                                   "is written by the step model); moves charged by the cost "
                                   "model") if self.copy_free_compaction else
                                  "kernels.compact_blocks (bytes copied)",
        }

    def loop_mapper(self) -> str:
        """The loop's mapper mode: "inline" needs modeled costs, so with CUDA (wall-clock
        costs) a mapper runs as a real thread."""
        if self.mapper == "inline" and self.arena_device == "cuda":
            return "thread"
        return self.mapper

    def cost_model(self):
        """The arena-operation cost model: modeled GPU time on the host backend, measured
        wall-clock time with CUDA."""
        from scheduler.costs import ModeledGPUCost, wall_clock_cost

        if self.arena_device == "cuda":
            return wall_clock_cost
        measured = self.measured_arena_cost
        per_chunk = {} if measured is None else {
            "map_s_per_chunk": measured.map_s_per_chunk,
            "unmap_s_per_chunk": measured.unmap_s_per_chunk}
        return ModeledGPUCost(device_bandwidth=COPY_EFFICIENCY * self.device.hbm_bandwidth,
                              **per_chunk)

    def cost_describe(self) -> dict:
        if self.arena_device == "cuda":
            return {"source": "measured wall-clock time of each arena call (CUDA)"}
        cm = self.cost_model()
        measured = self.measured_arena_cost
        where = {"map_unmap_source": "assumed"} if measured is None else {
            "map_unmap_source": f"measured: {measured.path} ({measured.date_utc}, "
                                f"{measured.device_name})", **measured.describe()}
        return {"source": "scheduler.costs.ModeledGPUCost (" + (
                    "assumed, not measured" if measured is None else
                    f"map/unmap measured on {measured.device_name}, {measured.path}; "
                    "compaction and swap modeled") + ")",
                **where,
                "map_per_chunk_us": cm.map_s_per_chunk * 1e6,
                "unmap_per_chunk_us": cm.unmap_s_per_chunk * 1e6,
                "compaction_copy_bandwidth_TBps": cm.device_bandwidth / 1e12,
                "compaction_copy_bandwidth_note": f"{COPY_EFFICIENCY:.0%} of peak HBM; each "
                                                  "moved byte read and written",
                "host_link_GBps": cm.host_bandwidth / 1e9,
                "per_op_overhead_us": cm.op_overhead_s * 1e6}


def build_setup(*, model: str = "llama-3-8b", device: str = "h100-sxm",
                device_memory_gib: float | None = None, activation_reserve_gib: float = 2.0,
                memory_utilization: float = 0.9, block_size: int = 16, max_tokens: int = 2048,
                token_budget: int = 2048, max_running: int = 256, preemption: str = "auto",
                arena_device: str | None = None, copy_kv_bytes: bool = False,
                kv_budget_gib: float | None = None, step_bias: float = 1.0,
                step_noise: float = 0.03, seed: int = 0,
                arena_costs_dir=RESULTS_ROOT) -> ReplaySetup:
    """Resolve presets and memory figures. ``kv_budget_gib``: the KV budget (every policy's
    cap and static's reservation) in GiB instead of the one derived from
    ``memory_utilization``; at most the device limit. ``step_bias``, ``step_noise``,
    ``seed``: the simulated GPU's (:class:`bench.step_truth.StepTruth`). ``arena_costs_dir``:
    folder searched for map/unmap costs measured on ``device`` (:mod:`bench.measured_costs`;
    None: assumed constants). Raises ValueError naming the bad argument."""
    import dataclasses

    import torch

    models, devices = _models(), _devices()
    if model not in models:
        raise ValueError(f"model must be one of {sorted(models)}, got {model!r}")
    if device not in devices:
        raise ValueError(f"device must be one of {sorted(devices)}, got {device!r}")
    m, d = models[model], devices[device]
    if device_memory_gib is not None:
        if not (isinstance(device_memory_gib, (int, float)) and device_memory_gib > 0):
            raise ValueError(f"device_memory_gib must be > 0, got {device_memory_gib!r}")
        d = dataclasses.replace(d, memory_bytes=int(device_memory_gib * GIB))
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization must be in (0, 1], got {memory_utilization!r}")
    if activation_reserve_gib < 0:
        raise ValueError(f"activation_reserve_gib must be >= 0, got {activation_reserve_gib!r}")
    for name, v in (("block_size", block_size), ("max_tokens", max_tokens),
                    ("token_budget", token_budget), ("max_running", max_running)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if arena_device is None:
        arena_device = "cuda" if torch.cuda.is_available() else "cpu"
    if arena_device not in ("cpu", "cuda"):
        raise ValueError(f"arena_device must be 'cpu' or 'cuda', got {arena_device!r}")
    weights = int(m.weight_bytes)
    reserve = int(activation_reserve_gib * GIB)
    limit = d.memory_bytes - weights - reserve
    budget = int(d.memory_bytes * memory_utilization) - weights - reserve
    if budget <= 0:
        raise ValueError(
            f"device_memory_gib: {d.memory_bytes / GIB:.1f} GiB x {memory_utilization} leaves "
            f"nothing for KV after {weights / GIB:.1f} GiB of {m.name} weights and "
            f"{reserve / GIB:.1f} GiB of activation reserve")
    if kv_budget_gib is not None:
        if isinstance(kv_budget_gib, bool) or not isinstance(kv_budget_gib, (int, float)) \
                or not 0 < kv_budget_gib <= limit / GIB:
            raise ValueError(f"kv_budget_gib must be > 0 and at most the device limit "
                             f"({limit / GIB:.2f} GiB), got {kv_budget_gib!r}")
        budget = int(kv_budget_gib * GIB)
    if arena_device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        limit = min(limit, int(free) - (256 << 20))
        budget = min(budget, limit)
    spec = m.kv_spec(block_size)
    setup = ReplaySetup(m, d, arena_device, block_size, d.memory_bytes, weights, reserve,
                        memory_utilization, limit, budget, max_tokens, token_budget,
                        max_running, preemption, spec,
                        copy_free_compaction=arena_device == "cpu" and not copy_kv_bytes,
                        kv_budget_set=kv_budget_gib is not None, step_bias=step_bias,
                        step_noise=step_noise, seed=seed,
                        measured_arena_cost=find_measured_arena_cost(device, arena_costs_dir))
    setup.step_truth()   # validates the truth's parameters now, naming the bad one
    return setup


# ------------------------------------------------------------------------------ one policy
def remap_tables_only(blocks, src, dst, block_tables=None) -> None:
    """A compaction that rewrites the block tables (every entry ``src[k]`` becomes
    ``dst[k]``) without copying block bytes: the arena's ``compact_fn`` for host replays,
    whose step model writes no KV, so the blocks hold nothing worth copying and copying them
    would only fault in pages of the host mapping. The arena still counts the moves and
    bytes, and the cost model charges them as device copies.

    ``blocks``: the arena's block-major buffer ``[num_blocks, ...]`` (only its first
    dimension is read); ``src``/``dst``: int64 tensors ``[m]``; ``block_tables``: int32
    tensor of any shape, rewritten in place (-1 padding untouched)."""
    if block_tables is None or src.numel() == 0:
        return
    if block_tables.device.type != "cpu":
        raise ValueError("block_tables must be a CPU tensor (remap_tables_only serves host "
                         "replays; GPU arenas use kernels.compact_blocks)")
    # The arena's own host remap, on the shared memory of the table.
    remap_block_ids(block_tables.numpy(), src.numpy(), dst.numpy(), int(blocks.shape[0]))


def parse_policy(name: str) -> tuple[str, str | None]:
    """``"static"`` -> ("static", None); ``"windowed:empirical"`` -> ("windowed",
    "empirical"). Raises ValueError naming ``policy`` for anything else."""
    memory, _, pred = name.partition(":")
    if memory in REACTIVE and not pred:
        return memory, None
    if memory == "windowed" and pred in PREDICTORS:
        return memory, pred
    raise ValueError(f"policy must be one of {', '.join(ALL_POLICIES)} (or 'all'), got {name!r}")


def run_policy(setup: ReplaySetup, trace: Trace, policy: str, *, progress: bool = True,
               steps_per_update: int = 200, planner=None) -> report.RunRecord:
    """Replay ``trace`` under ``policy`` (see :func:`parse_policy`) with a fresh arena and
    loop; returns what it recorded. The loop's clock is simulated seconds. ``planner``: a
    :class:`scheduler.planner.PlannerConfig` for the windowed policy (None: the
    scheduler's defaults)."""
    from arena import PagedArena
    from scheduler.latency import LatencyModel
    from scheduler.loop import EngineLoop, LoopConfig
    from scheduler.request import Request

    memory, pred = parse_policy(policy)
    spec = setup.kv_spec
    longest = int(trace.prompt_tokens.max()) + setup.max_tokens
    arena = PagedArena(spec, setup.device_limit_bytes, setup.arena_device,
                       device_limit_bytes=setup.device_limit_bytes,
                       max_seqs=setup.max_running,
                       max_blocks_per_seq=spec.blocks_for(longest),
                       compact_fn=remap_tables_only if setup.copy_free_compaction else None,
                       # likewise no swapped bytes are kept (the cost model still charges
                       # them): a swap-heavy replay would otherwise hold its KV budget on
                       # the host
                       swap_copies=not setup.copy_free_compaction)
    # CUDA: compile the compaction kernel now, so JIT time is not charged to the first shrink.
    warm_up_compaction(arena)
    # The planner's model is a prior fitted online; the steps take the simulated GPU's time.
    planner_latency = LatencyModel.from_hardware(setup.model, setup.device)
    step = setup.step_truth().step_fn(planner_latency, score_every=SCORE_EVERY)
    config = LoopConfig(memory=memory, predictor=pred or "max_tokens",
                        token_budget=setup.token_budget, max_running=setup.max_running,
                        cap_bytes=setup.kv_budget_bytes, static_bytes=setup.kv_budget_bytes,
                        preemption=setup.preemption, oversize="reject", planner=planner,
                        mapper=setup.loop_mapper(), prefetch_quantile=setup.prefetch_quantile)
    wall0 = time.perf_counter()
    loop = EngineLoop(arena, step, planner_latency, config, cost_model=setup.cost_model())
    n = len(trace)
    reqs = [Request(i, int(p), setup.max_tokens, int(o), float(a)) for i, (a, p, o) in
            enumerate(zip(trace.arrival_s, trace.prompt_tokens, trace.output_tokens))]
    loop.submit_many(reqs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=f"{policy:>20}", unit="req", leave=True, dynamic_ncols=True,
                   file=sys.stderr)
    done = 0
    try:
        while not loop.idle:   # in slices, to move the progress bar
            loop.run(max_steps=steps_per_update)
            if bar is not None:
                c = loop.metrics.counters
                finished = c.finished + c.rejected
                bar.update(finished - done)
                done = finished
                bar.set_postfix(sim_s=f"{loop.now:.0f}", mapped=f"{arena.mapped_bytes / GIB:.1f}G",
                                refresh=False)
    except BaseException:
        arena.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - wall0
    metrics = loop.metrics
    tl = metrics.timeline.arrays()
    c = metrics.counters
    counters = c.as_dict()
    counters.update(
        preemptions=c.preemptions,
        # a lease raise past the plan's budgets (an emergency grow) is a misprediction
        mispredictions=c.emergency_grows if memory == "windowed" else None)
    counters = {k: v for k, v in counters.items() if v is not None}
    all_reqs = [loop.requests[i] for i in range(n)]
    rejected = np.array([bool(r.extra.get("rejected")) for r in all_reqs])
    record = report.RunRecord(
        policy=policy, t_s=tl["t_s"], mapped_bytes=tl["mapped_bytes"],
        live_bytes=tl["live_bytes"], used_bytes=tl["used_bytes"], start_s=metrics.start_s,
        end_s=max(metrics.end_s, float(tl["t_s"][-1])),
        arrival_s=trace.arrival_s,
        first_token_s=np.array([r.first_token_s for r in all_reqs], dtype=np.float64),
        finish_s=np.array([r.finish_s if not rej else math.nan
                           for r, rej in zip(all_reqs, rejected)], dtype=np.float64),
        output_tokens=np.array([r.generated for r in all_reqs], dtype=np.int64),
        counters=counters,
        info={"memory": memory, "predictor": pred, "rejected": int(rejected.sum()),
              "wall_s": wall, "steps": c.steps, "timeline_samples": int(tl["t_s"].size),
              "chunk_bytes": arena.chunk_bytes, "blocks_per_chunk": arena.blocks_per_chunk,
              "token_bytes": spec.token_bytes,
              "arena_wall_s": c.arena_wall_s, "plan_wall_s": c.plan_wall_s,
              "latency_prediction": step.prediction_error()})
    arena.close()
    return record


# ------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kv-replay", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trace", default=None,
                   help="trace CSV path or name of a shared trace (azure_conv_2023, "
                        "mooncake_conv_first30min, mooncake_synthetic); default: the embedded "
                        "slice bench/data/azure_conv_2023_slice.csv")
    p.add_argument("--model", default="llama-3-8b", help="model preset: "
                   + ", ".join(sorted(_models())))
    p.add_argument("--device", default="h100-sxm", help="device preset (memory, bandwidth, "
                   "FLOP/s for the latency model): " + ", ".join(sorted(_devices())))
    p.add_argument("--device-memory-gib", type=float, default=None,
                   help="device memory in GiB (default: the device preset's)")
    p.add_argument("--activation-reserve-gib", type=float, default=2.0,
                   help="device memory kept for activations, besides the weights")
    p.add_argument("--memory-utilization", type=float, default=0.9,
                   help="share of device memory the engine may use (weights + KV); the KV "
                        "part is what static maps and every policy's cap")
    p.add_argument("--kv-budget-gib", type=float, default=None,
                   help="KV budget in GiB: every policy's cap and static's reservation "
                        "(default: --memory-utilization of device memory minus weights and "
                        "activation reserve); below the trace's peak live KV, policies preempt")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--policy", action="append", default=None,
                   help="memory policy, repeatable: static, on-demand, windowed (with each "
                        "--predictor), windowed:<predictor>, or all")
    p.add_argument("--predictor", action="append", default=None, choices=PREDICTORS,
                   help="remaining-length predictor(s) for windowed (repeatable; default all)")
    p.add_argument("--time-slice", default=None, metavar="START:END",
                   help="replay only requests arriving in [START, END) seconds (either side "
                        "may be empty); arrivals are re-based to START")
    p.add_argument("--max-requests", type=int, default=None,
                   help="replay at most this many requests (after --time-slice)")
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="max_tokens of every request (the bound the max_tokens predictor uses)")
    p.add_argument("--max-model-len", type=int, default=cli_checks.DEFAULT_MAX_MODEL_LEN,
                   help="longest request in tokens (prompt + max_tokens); longer trace rows "
                        "are dropped before the replay, counted and reported")
    p.add_argument("--token-budget", type=int, default=2048, help="tokens per model step")
    p.add_argument("--max-running", type=int, default=256, help="sequences running at once")
    p.add_argument("--preemption", default="auto", choices=PREEMPTION_MODES)
    p.add_argument("--shrink-min-blocks", type=int, default=None,
                   help="windowed: shrink at a window end only when at least this many blocks "
                        "are mapped beyond the plan (hysteresis; default: the scheduler's, one "
                        "chunk)")
    p.add_argument("--arrival-reserve-s", type=float, default=None,
                   help="windowed: seconds of admissions (at the recent rate) whose blocks a "
                        "shrink keeps mapped for the next window (default: the scheduler's, "
                        "0: the background mapper's learned prefetch does this)")
    p.add_argument("--max-decode-steps", type=int, default=None,
                   help="windowed: the longest decode window in steps (default: the "
                        "scheduler's, 256); shorter windows reserve less growth")
    p.add_argument("--margin-fraction", type=float, default=None,
                   help="windowed: safety margin on each pool's demand, a share of it "
                        "(default: the scheduler's, 0.02)")
    p.add_argument("--mapper", default="inline", choices=("off", "inline", "thread"),
                   help="background mapper of the elastic policies: maps ahead of need and "
                        "unmaps off the step loop (inline: modeled on the host; off: every "
                        "driver call on the step loop)")
    p.add_argument("--prefetch-quantile", type=float, default=0.9,
                   help="quantile of recent unforeseen per-step demand kept mapped ahead")
    p.add_argument("--copy-kv-bytes", action="store_true",
                   help="host backend: let compaction copy block bytes with the real kernel "
                        "(slow: faults in pages of the host mapping); by default it only "
                        "rewrites block tables, since the step model writes no KV")
    p.add_argument("--step-noise", type=float, default=0.03,
                   help="simulated GPU: log-space sigma of each step's mean-one lognormal "
                        "jitter (0: none)")
    p.add_argument("--step-bias", type=float, default=1.0,
                   help="simulated GPU: factor on every step's time (>1: slower than the "
                        "roofline calibration)")
    p.add_argument("--seed", type=int, default=0, help="seed of the step-time jitter")
    p.add_argument("--arena-costs-dir", default=str(RESULTS_ROOT),
                   help="folder searched (recursively) for arena.json files measured on a "
                        "GPU; map/unmap costs measured on the --device preset's GPU replace "
                        "the assumed ones ('none': always the assumed ones)")
    p.add_argument("--out", default="out/replay", help="output folder (JSON, PNG, table)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def policies_from_args(policies: Sequence[str] | None,
                       predictors: Sequence[str] | None) -> list[str]:
    """Expand ``--policy``/``--predictor`` into policy names (order kept, no repeats)."""
    preds = list(dict.fromkeys(predictors)) if predictors else list(PREDICTORS)
    out: list[str] = []
    for p in (policies or ["all"]):
        for q in p.split(","):
            q = q.strip()
            if q == "all":
                names = list(REACTIVE) + [f"windowed:{x}" for x in preds]
            elif q == "windowed":
                names = [f"windowed:{x}" for x in preds]
            else:
                parse_policy(q)
                names = [q]
            out.extend(n for n in names if n not in out)
    return out


def parse_time_slice(text: str) -> tuple[float, float | None]:
    """``"START:END"`` -> (start, end or None); ValueError naming ``--time-slice``."""
    start, sep, end = text.partition(":")
    try:
        s = float(start) if start.strip() else 0.0
        e = float(end) if end.strip() else None
    except ValueError:
        raise ValueError(f"--time-slice must be START:END in seconds, got {text!r}") from None
    if not sep or s < 0 or (e is not None and e <= s):
        raise ValueError(f"--time-slice must be START:END with 0 <= START < END, got {text!r}")
    return s, e


def header_lines(setup: ReplaySetup, trace: Trace) -> list[str]:
    """What was assumed, printed above the table."""
    d = setup.describe()
    lat = d["latency_model"]
    truth = d["step_truth"]
    cal = truth["calibration_noise_free"]
    cost = d["arena_cost_model"]
    tr = trace.describe()
    lines = [
        f"trace: {trace.name} ({tr['requests']} requests over {tr['span_s']:.0f} s; prompt mean "
        f"{tr['prompt_tokens']['mean']:.0f}, output mean {tr['output_tokens']['mean']:.0f} "
        f"tokens; source {trace.source})",
        f"model: {setup.model.name} ({setup.model.num_params / 1e9:.2f} B params, "
        f"{setup.model.dtype_bytes * 8}-bit; KV {setup.model.kv_bytes_per_token / 1024:.0f} KiB "
        f"per token, block {setup.block_size} tokens = "
        f"{setup.kv_spec.block_bytes / 2**20:.2f} MiB)",
        f"device: {setup.device.name}, {setup.device_memory_bytes / GIB:.0f} GiB, "
        f"{setup.device.hbm_bandwidth / 1e12:.2f} TB/s, {setup.device.fp16_flops / 1e12:.0f} "
        f"TFLOP/s fp16; arena backend: {d['arena_backend']}",
        f"memory: weights {d['weights_gib']:.1f} GiB + activation reserve "
        f"{d['activation_reserve_gib']:.1f} GiB; KV budget (cap of every policy, static's "
        f"reservation) {d['kv_budget_gib']:.3g} GiB = "
        + ("set by --kv-budget-gib" if setup.kv_budget_set else
           f"{setup.memory_utilization:.0%} of device memory minus those")
        + f"; device limit {d['device_limit_gib']:.1f} GiB",
        f"step time (simulated GPU, {truth['source']}): decode step 1 seq @1k ctx "
        f"{cal['decode_step_1seq_1k_ctx_ms']:.2f} ms, 32 seqs @32k ctx "
        f"{cal['decode_step_32seq_32k_ctx_ms']:.2f} ms; prefill 1k tokens "
        f"{cal['prefill_1k_tokens_ms']:.2f} ms; HBM {truth['memory_efficiency']:.0%}, GEMM "
        f"{truth['gemm_efficiency']:.0%}, attention {truth['attention_efficiency']:.0%} of "
        f"peak, {truth['step_overhead_s'] * 1e3:.2f} ms per step; bias {truth['bias']:g}, "
        f"jitter sigma {truth['noise_sigma']:g}, seed {truth['seed']}",
        f"planner's latency prior ({lat['source']}; fitted online): decode step 1 seq @1k "
        f"ctx {lat['decode_step_1seq_1k_ctx_ms']:.2f} ms, 32 seqs @32k ctx "
        f"{lat['decode_step_32seq_32k_ctx_ms']:.2f} ms; prefill 1k tokens "
        f"{lat['prefill_1k_tokens_ms']:.2f} ms",
    ]
    if "map_per_chunk_us" in cost:
        lines.append(
            f"arena op cost ({cost['source']}): map {cost['map_per_chunk_us']:.0f} us/chunk, "
            f"unmap {cost['unmap_per_chunk_us']:.0f} us/chunk, compaction at "
            f"{cost['compaction_copy_bandwidth_TBps']:.2f} TB/s, swap at "
            f"{cost['host_link_GBps']:.0f} GB/s")
    else:
        lines.append(f"arena op cost: {cost['source']}")
    lines.append(f"compaction: {d['compaction_on_host']}" if setup.arena_device == "cpu"
                 else "compaction: kernels.compact_blocks on the GPU")
    lines.append(f"requests: max_tokens {setup.max_tokens}, token budget {setup.token_budget} "
                 f"per step, at most {setup.max_running} running, preemption {setup.preemption}")
    return lines


def prediction_error_lines(runs) -> str:
    """A Markdown list: per policy, how far the planner's one-step-ahead step-time
    predictions were from the simulated GPU (``info["latency_prediction"]``)."""
    lines = ["Planner's step-time prediction error (one step ahead, against the simulated "
             "GPU):", ""]
    for r in runs:
        e = r.info.get("latency_prediction") or {}
        if not e.get("steps"):
            lines.append(f"- {r.policy}: no steps")
            continue
        lines.append(
            f"- {r.policy}: MAPE {e['mape_pct']:.1f}% over {e['steps']} scored steps of "
            f"{e['steps_run']} (bias "
            f"{e['bias_pct']:+.1f}%, |error| p50 {e['abs_pct_p50']:.1f}% p99 "
            f"{e['abs_pct_p99']:.1f}%; first 32 steps {e['mape_first_32_steps_pct']:.1f}%)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the replay (see ``--help``); prints the table on stdout and writes
    ``<out>/replay.json``, ``<out>/table.md`` and ``<out>/memory.png``. Returns 0, or 2 on
    bad arguments."""
    from bench import engine_replay   # `--engine model`: real forward passes (issue 10)
    if engine_replay.wants_engine(argv):
        return engine_replay.main(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cli_checks.check_replay_numbers(
            device_memory_gib=args.device_memory_gib,
            activation_reserve_gib=args.activation_reserve_gib,
            memory_utilization=args.memory_utilization, block_size=args.block_size,
            max_tokens=args.max_tokens, token_budget=args.token_budget,
            max_running=args.max_running, max_model_len=args.max_model_len,
            arrival_reserve_s=args.arrival_reserve_s, shrink_min_blocks=args.shrink_min_blocks)
        cli_checks.check_step_truth_numbers(step_noise=args.step_noise,
                                            step_bias=args.step_bias, seed=args.seed)
        policies = policies_from_args(args.policy, args.predictor)
        trace = load_trace(args.trace)
        if args.time_slice:
            trace = trace.time_slice(*parse_time_slice(args.time_slice))
        if args.max_requests is not None:
            if args.max_requests < 1:
                raise ValueError(f"--max-requests must be >= 1, got {args.max_requests}")
            trace = trace.head(args.max_requests)
        trace, dropped, longest = cli_checks.drop_over_max_model_len(
            trace, args.max_model_len, args.max_tokens)
        setup = build_setup(model=args.model, device=args.device,
                            device_memory_gib=args.device_memory_gib,
                            activation_reserve_gib=args.activation_reserve_gib,
                            memory_utilization=args.memory_utilization,
                            block_size=args.block_size, max_tokens=args.max_tokens,
                            token_budget=args.token_budget, max_running=args.max_running,
                            preemption=args.preemption, copy_kv_bytes=args.copy_kv_bytes,
                            kv_budget_gib=args.kv_budget_gib, step_bias=args.step_bias,
                            step_noise=args.step_noise, seed=args.seed,
                            arena_costs_dir=(None if args.arena_costs_dir == "none"
                                             else args.arena_costs_dir))
        setup.mapper = args.mapper
        cli_checks.check_number("--prefetch-quantile", args.prefetch_quantile, 0.0, 1.0)
        setup.prefetch_quantile = args.prefetch_quantile
        planner = None
        knobs = {k: v for k, v in (("shrink_min_blocks", args.shrink_min_blocks),
                                    ("arrival_reserve_s", args.arrival_reserve_s),
                                    ("max_decode_steps", args.max_decode_steps),
                                    ("margin_fraction", args.margin_fraction)) if v is not None}
        if knobs:
            from scheduler.planner import PlannerConfig
            planner = PlannerConfig(**knobs)
        # last, so a bad argument creates no folder; still before any compute
        out = cli_checks.check_out_dir(args.out)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))    # exits with status 2
    head = header_lines(setup, trace)
    if dropped:
        note = (f"dropped {dropped} requests longer than --max-model-len {args.max_model_len} "
                f"(prompt + max_tokens; the longest needs {longest} tokens)")
        head.append(note)
        print(f"kv-replay: {note}", file=sys.stderr)
    if knobs:
        head.append("windowed planner: " + ", ".join(f"{k}={v}" for k, v in knobs.items()))
    from scheduler.planner import PlannerConfig
    effective = planner if planner is not None else PlannerConfig()
    if not args.quiet:
        print("\n".join(head), file=sys.stderr)
    wall0 = time.perf_counter()
    runs = [run_policy(setup, trace, p, progress=not args.quiet, planner=planner)
            for p in policies]
    wall = time.perf_counter() - wall0
    summaries = [report.summarize(r) for r in runs]
    report.common_denominator(summaries, "static")
    table = report.markdown_table(summaries)
    targets = report.check_targets(summaries)
    # issue 9's targets for windowed:empirical, else the first windowed policy replayed
    windowed = [p for p in policies if p.startswith("windowed")]
    target_policy = "windowed:empirical" if "windowed:empirical" in windowed else (
        windowed[0] if windowed else "")
    scarce = report.check_scarce_targets(summaries, target_policy)

    from bench._common import environment
    doc = {
        "environment": environment(setup.arena_device),
        "command": "python -m bench.replay " + " ".join(sys.argv[1:] if argv is None else argv),
        "trace": {**trace.describe(), "max_model_len": args.max_model_len,
                  "dropped_over_max_model_len": dropped},
        # the windowed planner's effective knobs, defaults included, so a result never
        # depends on what the defaults are when it is read
        "setup": {**setup.describe(),
                  "shrink_min_blocks": effective.shrink_min_blocks,
                  "arrival_reserve_s": effective.arrival_reserve_s,
                  "max_decode_steps": effective.max_decode_steps,
                  "margin_fraction": effective.margin_fraction},
        "wall_s": wall,
        "definitions": report.measures.__doc__,
        "policies": summaries,
        "targets": targets,
        # issue 9's targets at this budget (plentiful or scarce regime)
        "scarce_targets": scarce,
        # 400 slices, 0.1 MiB / 1 ms resolution: enough to redraw the plot, small to commit
        "timelines": {r.policy: {k: np.round(v, 3 if k == "t_s" else 4).tolist()
                                 for k, v in report.bucket_timeline(r, 400).items()}
                      for r in runs},
    }
    text = "\n".join(f"- {h}" for h in head) + "\n\n" + table + "\n"
    text += "\n" + prediction_error_lines(runs) + "\n"
    if targets:
        text += ("\nTargets (windowed:empirical against static):\n\n"
                 + report.targets_table(targets) + "\n")
    if scarce:
        text += (f"\nIssue 9 targets ({scarce[0]['regime']} memory, {target_policy}):\n\n"
                 + report.targets_table(scarce) + "\n")
    writers = {"replay.json": lambda p: report.write_json(p, doc),
               "table.md": lambda p: p.write_text(text)}
    if not args.no_plot:
        title = (f"{trace.name}: {setup.model.name} on {setup.device.name} - mapped (solid) "
                 f"and live (dashed) KV memory")
        writers["memory.png"] = lambda p: report.plot_memory(runs, p, title=title)
    cli_checks.write_all_or_nothing(out, writers)  # a failed PNG leaves no half-written set
    print("\n".join(f"- {h}" for h in head))
    print()
    print(table)
    if targets:
        print("\nTargets (windowed:empirical against static):\n")
        print(report.targets_table(targets))
    print("\n" + prediction_error_lines(runs))
    print(f"\n({len(runs)} policies replayed in {wall:.1f} s wall; results in {out}/)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
