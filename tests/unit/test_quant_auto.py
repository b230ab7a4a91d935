"""The auto allocator: constraints always hold, and it finds the optimum where one is known."""
import itertools
import math

import pytest

from comfyui_accel.quant import auto
from comfyui_accel.quant.formats import Spec


def opts(*pairs):
    out = [auto.Option(None, 160, math.inf)]
    for name, nbytes, db in pairs:
        out.append(auto.Option(Spec(name), nbytes, db))
    return out


def brute_force(table, budget):
    best = None
    layers = list(table)
    for choice in itertools.product(*(table[layer] for layer in layers)):
        size = sum(o.nbytes for o in choice)
        if size > budget:
            continue
        noise = sum(o.noise for o in choice)
        if best is None or noise < best[0]:
            best = (noise, choice)
    return best


def test_floor_alone_takes_the_smallest_option_that_reaches_it():
    table = {"a": opts(("int4", 40, 20.0), ("int8", 80, 40.0)), "b": opts(("int4", 40, 35.0), ("int8", 80, 45.0))}
    chosen = auto.allocate(table, min_sqnr_db=30.0)
    assert chosen["a"][0].spec.format == "int8" and chosen["b"][0].spec.format == "int4"
    assert "30 dB" in chosen["a"][1]
    # a floor no format reaches keeps the layer in 16 bits
    assert auto.allocate(table, min_sqnr_db=50.0)["a"][0].spec is None


def test_budget_is_respected_and_spent_where_it_helps_most():
    # b gains far more from 8 bits than a does
    table = {"a": opts(("int4", 40, 30.0), ("int8", 80, 33.0)), "b": opts(("int4", 40, 15.0), ("int8", 80, 40.0))}
    chosen = auto.allocate(table, budget_bytes=120)
    assert chosen["a"][0].spec.format == "int4" and chosen["b"][0].spec.format == "int8"
    assert sum(c[0].nbytes for c in chosen.values()) <= 120


@pytest.mark.parametrize("budget", [160, 200, 260, 320, 480])
def test_matches_brute_force_on_identical_convex_layers(budget):
    # identical layers with convex options: the greedy walk along the hull is optimal
    layer = opts(("int4", 40, 20.0), ("int8", 80, 40.0))
    table = {name: layer for name in "abcd"}
    chosen = auto.allocate(table, budget_bytes=budget)
    got = sum(c[0].noise for c in chosen.values())
    assert sum(c[0].nbytes for c in chosen.values()) <= budget
    assert got == pytest.approx(brute_force(table, budget)[0])


def test_dominated_options_are_never_chosen():
    # w4a8 is bigger and worse than int4 here
    table = {"a": opts(("int4", 40, 20.0), ("w4a8", 45, 18.0), ("int8", 80, 40.0))}
    for budget in (40, 44, 50, 79):
        assert auto.allocate(table, budget_bytes=budget)["a"][0].spec.format == "int4"


def test_unmeetable_budget_says_what_is_needed():
    table = {"a": opts(("int4", 40, 20.0)), "b": opts(("int4", 40, 20.0))}
    with pytest.raises(auto.BudgetError) as err:
        auto.allocate(table, budget_bytes=60)
    assert err.value.needed_bytes == 80
    with pytest.raises(auto.BudgetError):
        auto.allocate(table, budget_bytes=100, min_sqnr_db=25.0)  # the floor forces 16 bits


def test_candidate_list_parsing():
    assert auto.parse_candidates("int8, int4;w4a8, int8") == ["int8", "int4", "w4a8"]
    with pytest.raises(ValueError, match="int3"):
        auto.parse_candidates("int8, int3")
