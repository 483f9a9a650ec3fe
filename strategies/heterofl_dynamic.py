"""HeteroFL's ``dynamic`` model split: every server round each node's capacity is drawn anew."""

from __future__ import annotations

import torch

from fl_subnet.core.samplers import generator_for

from .heterofl import HeteroFL
from .registry import register_protocol

DRAW_SLOT = -3  # generator_for slot of the round's capacity draw (-1: IST partition, -2: node sample)


@register_protocol(
    "heterofl-dynamic",
    mask="first ⌈r·size⌉ units (nested), r drawn anew every round from the tiers' proportions",
    local_work="τ",
    scale="1/r",
    aggregation="count mean over holders",
    source="Diao et al. ICLR 2021 (`dynamic` model split)")
class HeteroFLDynamic(HeteroFL):
    """HeteroFL with its reference code's ``dynamic`` model split (Diao, Ding & Tarokh, ICLR
    2021, §4 "Dynamic"): every server round, each node trains the nested sub-model of a
    capacity drawn anew, with replacement, from the levels in the proportions of
    ``capacity_tiers``; :class:`HeteroFL` is the ``fix`` split (one capacity per node).

    Reference: HeteroFL's official code (``src/fed.py``, ``Federation.make_model_rate``):
    ``rate_idx = torch.multinomial(torch.tensor(cfg['proportion']), num_samples=cfg['num_users'],
    replacement=True)`` each round, ``proportion`` being the share of each level. Here the
    levels and their shares are the entries of ``capacity_tiers`` ("1,0.5,0.5,0.5": a
    quarter of the draws 1, three quarters 0.5): one uniform draw of an entry per node,
    from a generator seeded by (seed, server round) alone, for the nodes in their order
    (:meth:`order_nodes`), so a simulation, a deployment and the in-process grid agree.

    A node that declares its capacity (node config ``capacity``) keeps it: a declared
    capacity is what the device can train, not a share of a simulated population.

    Parameters are those of :class:`HeteroFL`.
    """

    @classmethod
    def from_run_config(cls, cfg, model_factory, **common):
        """Build from a run config (:func:`~fl_subnet.strategies.build_strategy` passes ``common``)."""
        return cls(model_factory, cfg.tiers(), local_steps=cfg.local_steps, fraction_train=cfg.fraction_train,
                   label_split=getattr(cfg, "label_split", False), **common)

    def configure_train(self, server_round, arrays, config, grid):
        self._round = server_round + self.round_offset  # the round whose capacities capacity_of draws
        self._drawn: list[float] = []
        return super().configure_train(server_round, arrays, config, grid)

    def round_capacities(self, server_round: int, num_nodes: int) -> list[float]:
        """The capacities drawn in ``server_round`` for the first ``num_nodes`` nodes in order."""
        gen = generator_for(self.seed, server_round, DRAW_SLOT)
        return [self.capacity_tiers[i] for i in torch.randint(len(self.capacity_tiers), (num_nodes,),
                                                               generator=gen).tolist()]

    def capacity_of(self, node: int) -> float | None:
        """A declared capacity, else the one drawn for the node's position this round."""
        if node in self._capacity or node not in self._order or not hasattr(self, "_round"):
            return super().capacity_of(node)
        if len(self._drawn) != len(self._order):
            self._drawn = self.round_capacities(self._round, len(self._order))
        return self._drawn[self._order.index(node)]
