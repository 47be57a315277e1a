"""Sharded monitoring: every rank of a distributed run carries its share of the monitor.

Each monitored matrix has one *owner* rank (balanced by cost, :func:`balance`). The
owner keeps that matrix's base, previous snapshot and spectra and measures it on its
own worker thread; the per-matrix records are gathered to rank 0, which aggregates
and logs exactly what a single process would. Host memory per rank is then about
the total over the world size (plus one matrix being gathered), and so is the metric
time.

Collectives of the monitor go through its own gloo process groups (created once, on
every rank, at train start), never through the training's group: the worker threads
gather records while the training thread runs its own collectives. Two threads issue
the monitor's collectives, so it has two groups: the worker thread gathers
(:meth:`Shards.gather`, in job order) over ``group``, the training thread agrees
(:meth:`Shards.agree`) over ``control``. Within one thread the sequence is the same on
every rank; across threads it is not (one rank's training thread may reach an
agreement before its worker reaches a gather, another's after), and collectives of
one group issued in a different order on different ranks deadlock. Every decision
that changes which collectives run (dropping a snapshot because a worker is busy) is
taken by all ranks together (:meth:`Shards.agree`), so the ranks' sequences of
gathers always match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .naming import MatrixSpec

__all__ = ["Shards", "balance", "cost"]


def cost(spec: MatrixSpec, rank: int) -> float:
    """Relative work of one matrix per snapshot: the mask pass reads ``m n`` elements and
    the spectral step multiplies ``W`` by blocks of about ``rank`` columns a few times."""
    m, n = spec.shape
    return float(m * n) * (4.0 + min(rank, m, n))


def balance(specs: Sequence[MatrixSpec], world: int, rank: int = 32,
            groups: Sequence[Sequence[MatrixSpec]] | None = None) -> dict[str, int]:  # fmt: skip
    """Owner rank of every matrix: longest-processing-time-first greedy over :func:`cost`
    (deterministic, so every rank computes the same assignment).

    ``groups``: the matrices measured together (``layers_per_snapshot`` rotation). A
    snapshot then takes as long as its slowest rank's share of *its* group, so each group
    is balanced on its own; ties go to the rank with the least work overall, which keeps
    the memory (every matrix's base lives on its owner) balanced too. Without groups:
    one group of all matrices."""
    total = [0.0] * world
    owner: dict[str, int] = {}
    for group in groups if groups else [specs]:
        loads = [0.0] * world
        for spec in sorted(group, key=lambda s: (-cost(s, rank), s.name)):
            r = min(range(world), key=lambda i: (loads[i], total[i], i))
            owner[spec.name] = r
            loads[r] += cost(spec, rank)
            total[r] += cost(spec, rank)
    return owner


@dataclass
class Shards:
    """This process's place in the world and who owns which matrix."""

    rank: int = 0
    world: int = 1
    owner: dict[str, int] = field(default_factory=dict)
    group: Any = None  # gloo group of the worker thread's gathers (None: single process)
    control: Any = None  # gloo group of the training thread's agreements (None: ``group``)

    @classmethod
    def single(cls, specs: Sequence[MatrixSpec]) -> Shards:
        return cls(owner={s.name: 0 for s in specs})

    @classmethod
    def current(cls, specs: Sequence[MatrixSpec], rank_hint: int = 32) -> Shards:
        """The sharding of the running job: one process unless ``torch.distributed`` is
        initialised with more than one rank. Call on every rank (it creates a group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return cls.single(specs)
        world = dist.get_world_size()
        group, control = dist.new_group(backend="gloo"), dist.new_group(backend="gloo")
        return cls(rank=dist.get_rank(), world=world, owner=balance(specs, world, rank_hint), group=group,
                   control=control)  # fmt: skip

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def mine(self, specs: Sequence[MatrixSpec]) -> list[MatrixSpec]:
        return [s for s in specs if self.owner.get(s.name, 0) == self.rank]

    def agree(self, ok: bool) -> bool:
        """True only if every rank says True (an all-reduce of one flag). Called from the
        training thread only (over ``control``)."""
        if not self.distributed:
            return ok
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control if self.control is not None else self.group)
        return int(flag.item()) == 0

    def gather(self, payload: Any) -> list[Any] | None:
        """Every rank's ``payload`` on rank 0 (in rank order), None elsewhere. Called from
        the monitor's worker thread only (over ``group``)."""
        if not self.distributed:
            return [payload]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(payload, out, dst=0, group=self.group)
        return out
