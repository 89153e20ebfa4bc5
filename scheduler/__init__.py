"""The window scheduler: durations, remaining lengths, window plans, and the engine loop.

Layering: the scheduler calls the arena's API only (pools, block tables, shrink, swap),
all of it through :class:`~scheduler.metered.MeteredArena`; it never touches device
pointers. See :mod:`scheduler.planner` for the planner (plain data in, plain data out),
:mod:`scheduler.memory` for the memory policies (which return a
:class:`~scheduler.decision.Decision`), :mod:`scheduler.loop` for the loop that carries
decisions out, and docs/ARCHITECTURE.md for how they talk.
"""
from .costs import ArenaOp, ModeledGPUCost, wall_clock_cost
from .latency import DEVICES, MODELS, DeviceSpec, LatencyModel, ModelShape
from .loop import Batch, EngineLoop, LoopConfig, latency_step
from .metrics import Counters, Metrics, RequestRecord, Timeline
from .planner import ArenaState, Demand, Plan, PlannerConfig, WindowPlanner
from .costs import COST_MODELS, CostModel
from .decision import Decision, QueueView
from .memory import MEMORY_POLICIES, MemoryPolicy
from .metered import MeteredArena
from .planner import PlanLimits
from .policies import PREEMPTION_MODES, PreemptionMode, VICTIM_ORDERS, VICTIM_POLICIES
from .registry import Registry
from .predictor import (EmpiricalPredictor, MaxTokensPredictor, OraclePredictor, PREDICTORS,
                        make_predictor)
from .request import Phase, Request, RequestSet

__all__ = ["ArenaOp", "ModeledGPUCost", "wall_clock_cost", "DEVICES", "MODELS", "DeviceSpec",
           "LatencyModel", "ModelShape", "Batch", "EngineLoop", "LoopConfig", "latency_step",
           "Counters", "Metrics", "RequestRecord", "Timeline", "ArenaState", "Demand", "Plan",
           "PlannerConfig", "WindowPlanner", "PreemptionMode", "VICTIM_POLICIES",
           "EmpiricalPredictor", "MaxTokensPredictor", "OraclePredictor", "PREDICTORS",
           "make_predictor", "Phase", "Request", "RequestSet", "COST_MODELS", "CostModel",
           "Decision", "QueueView", "MEMORY_POLICIES", "MemoryPolicy", "MeteredArena",
           "PlanLimits", "PREEMPTION_MODES", "VICTIM_ORDERS", "Registry"]
