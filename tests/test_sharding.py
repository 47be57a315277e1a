"""Who owns which matrix in a sharded run (rlmonitor.core.sharding.balance), through the
real GeometryMonitor constructor (no process group needed: the owner map is a pure
function of the matrices and the world size, computed the same way on every rank)."""

from __future__ import annotations

import pytest

from rlmonitor.core.config import GeometryConfig
from rlmonitor.core.monitor import GeometryMonitor
from rlmonitor.core.naming import MatrixSpec
from rlmonitor.core.sharding import Shards, balance, cost

# Qwen2.5-0.5B: 24 layers of q/o 896x896, k/v 128x896, gate/up 4864x896, down 896x4864
SHAPES = {"self_attn.q_proj": (896, 896), "self_attn.k_proj": (128, 896), "self_attn.v_proj": (128, 896),
          "self_attn.o_proj": (896, 896), "mlp.gate_proj": (4864, 896), "mlp.up_proj": (4864, 896),
          "mlp.down_proj": (896, 4864)}  # fmt: skip
SPECS = [MatrixSpec.from_name(f"layers.{i}.{leaf}", shape, 64) for i in range(24) for leaf, shape in SHAPES.items()]
RANK = 16 + 16  # the callback's rank hint for the default k


def _monitors(world: int, **cfg) -> list[GeometryMonitor]:
    """Every rank's monitor, each built as the callback builds it (Shards.current's owner map)."""
    config = GeometryConfig(max_snapshot_memory_gb=1e6, **cfg)
    owner = balance(SPECS, world, RANK)
    return [GeometryMonitor(config, SPECS, "/nonexistent", itemsizes={s.name: 2 for s in SPECS},
                            shards=Shards(rank=r, world=world, owner=dict(owner))) for r in range(world)]  # fmt: skip


def _group_imbalance(mon: GeometryMonitor, owner: dict[str, int], world: int) -> float:
    """Largest over rotation groups of (slowest rank's cost) / (mean rank's cost)."""
    worst = 0.0
    for group in mon.groups:
        loads = [0.0] * world
        for s in group:
            loads[owner[s.name]] += cost(s, RANK)
        worst = max(worst, max(loads) / (sum(loads) / world))
    return worst


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_every_matrix_has_one_owner_and_loads_are_lpt_balanced(world):
    owner = balance(SPECS, world, RANK)
    assert set(owner) == {s.name for s in SPECS} and set(owner.values()) == set(range(world))
    loads = [sum(cost(s, RANK) for s in SPECS if owner[s.name] == r) for r in range(world)]
    assert max(loads) - min(loads) <= max(cost(s, RANK) for s in SPECS)  # the LPT bound
    assert balance(list(reversed(SPECS)), world, RANK) == owner  # the same on every rank, whatever the order


@pytest.mark.parametrize(("world", "layers", "bound"), [(4, 4, 1.01), (4, 2, 1.2), (8, 4, 1.2), (8, 2, 1.2)])
def test_rotation_balances_each_group(world, layers, bound):
    """With layers_per_snapshot a snapshot takes its slowest rank's share of one group:
    each group is balanced on its own (it was up to 1.29x / 2.34x the mean before), and
    the memory (each rank's owned weights) stays balanced."""
    mons = _monitors(world, layers_per_snapshot=layers)
    owner = mons[0].shards.owner
    assert all(m.shards.owner == owner for m in mons)  # every rank computes the same map
    assert _group_imbalance(mons[0], owner, world) <= bound
    assert _group_imbalance(mons[0], balance(SPECS, world, RANK), world) > bound  # the whole-run balance alone
    mine = [sum(s.numel for s in m.mine) for m in mons]
    assert sum(mine) == sum(s.numel for s in SPECS) and max(mine) <= 1.03 * sum(mine) / world
    need = [m.estimate_bytes() for m in mons]
    assert max(need) <= 1.1 * sum(need) / world


def test_without_rotation_the_owner_map_is_kept():
    mons = _monitors(4)
    assert all(m.shards.owner == balance(SPECS, 4, RANK) for m in mons)
    assert sorted(s.name for m in mons for s in m.mine) == sorted(s.name for s in SPECS)
