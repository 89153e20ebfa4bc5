"""One registry shape for every pluggable policy; the planner takes what the engine fixes
as limits and refuses a contradicting config instead of overwriting it."""
import numpy as np
import pytest

from scheduler import (COST_MODELS, MEMORY_POLICIES, PREEMPTION_MODES, PREDICTORS,
                       VICTIM_ORDERS, LatencyModel, ModeledGPUCost, PlanLimits, PlannerConfig,
                       PreemptionMode, Registry, WindowPlanner)
from scheduler.costs import WallClockCost
from scheduler.policies import most_blocks_first
from scheduler.predictor import PredictorBase
from tests.scheduler_helpers import LAT, OneTokenLeft, make_arena, make_loop


def test_every_registry_resolves_names_and_objects_the_same_way():
    assert VICTIM_ORDERS.resolve("most-blocks") is most_blocks_first
    assert PREEMPTION_MODES.resolve("swap", host_bandwidth=1e9).host_bandwidth == 1e9
    assert isinstance(COST_MODELS.resolve("modeled-gpu"), ModeledGPUCost)
    assert isinstance(COST_MODELS.resolve("wall-clock"), WallClockCost)
    assert MEMORY_POLICIES.names == ("static", "on-demand", "windowed")
    assert PREDICTORS.names == ("max_tokens", "empirical", "oracle")
    for reg, bad in ((VICTIM_ORDERS, 3), (PREDICTORS, 3), (COST_MODELS, 3),
                     (MEMORY_POLICIES, object()), (PREEMPTION_MODES, 3)):
        with pytest.raises(ValueError, match=reg.kind):
            reg.resolve("no-such-name")
        with pytest.raises(TypeError, match=reg.kind):
            reg.resolve(bad)


def test_register_adds_a_name_once():
    reg = Registry("thing", {"a": lambda: 1}, accepts=lambda x: isinstance(x, int))
    reg.register("b", lambda: 2)
    assert reg.names == ("a", "b") and reg.resolve("b") == 2 and reg.resolve(7) == 7
    with pytest.raises(ValueError, match="already"):
        reg.register("a", lambda: 3)


def test_a_foreign_predictor_gets_the_optional_members():
    p = PREDICTORS.resolve(OneTokenLeft())
    assert isinstance(p, PredictorBase) and not p.wants_true_lengths
    p.reveal(1, 5)                                    # a no-op, not an AttributeError
    assert p.predict(np.array([0]), np.array([0]), np.array([9])).tolist() == [1]
    mine = PREDICTORS.resolve("oracle")
    assert PREDICTORS.resolve(mine) is mine and mine.wants_true_lengths


def test_planner_config_keeps_names_and_the_planner_resolves_them():
    cfg = PlannerConfig(victim="most-blocks", preemption="swap")
    assert cfg.victim == "most-blocks" and cfg.preemption == "swap"
    pl = WindowPlanner(LatencyModel(LAT), "max_tokens", cfg)
    assert pl.victim is most_blocks_first and isinstance(pl.preemption, PreemptionMode)
    assert pl.limits == PlanLimits()


def test_the_engine_limits_win_only_where_the_config_is_silent():
    lim = PlanLimits(block_size=4, token_budget=64)
    pl = WindowPlanner(LatencyModel(LAT), "max_tokens", PlannerConfig(token_budget=64),
                       limits=lim, victim="most-recent")
    assert pl.limits is lim
    with pytest.raises(ValueError, match="token_budget"):
        WindowPlanner(LatencyModel(LAT), "max_tokens", PlannerConfig(token_budget=32),
                      limits=lim)
    with pytest.raises(ValueError, match="victim"):
        WindowPlanner(LatencyModel(LAT), "max_tokens", PlannerConfig(victim="most-blocks"),
                      victim="most-recent")
    # Through the loop: a planner knob that contradicts the loop is an error.
    with pytest.raises(ValueError, match="token_budget"):
        make_loop(make_arena(), memory="windowed", token_budget=32,
                  planner=PlannerConfig(token_budget=16))
    loop = make_loop(make_arena(), memory="windowed", token_budget=32, preemption="swap",
                     planner=PlannerConfig(preemption="swap", min_decode_steps=3))
    assert loop.memory.planner.limits.token_budget == 32
    assert loop.memory.planner.preemption is loop.preemption
