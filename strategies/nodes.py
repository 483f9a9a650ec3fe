"""Which nodes train in a round, in which order, and with which capacity.

A mixin of :class:`~strategies.base.SubnetStrategy` (not a Flower strategy itself): Flower
node ids are random per run, so nodes are ordered by the ``partition-id`` they report to a
one-off QUERY (when ``order_by_partition``), which makes the same seed pair the same data
with the same mask in a simulation, a deployment and in-process; the same query learns a
node's declared ``capacity`` (node config) for the width-heterogeneous protocols, and the
``labels`` it holds for HeteroFL's label split (:mod:`fl_subnet.core.label_split`).
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl_subnet.core.label_split import check_labels
from fl_subnet.core.samplers import generator_for
from fl_subnet.wire.records import LABELS_KEY
from fl_subnet.exceptions import NotEnoughNodes  # noqa: F401  (re-exported: raised here)

log = logging.getLogger(__name__)


class NodeSampling:
    """Node ordering, sampling, capacities and the wait for enough nodes.

    Expects the attributes :class:`~strategies.base.SubnetStrategy` sets:
    ``order_by_partition``, ``query_timeout``, ``node_wait_timeout``, ``num_train_nodes``,
    ``seed``, ``capacity_tiers``, ``configrecord_key`` and Flower's ``fraction_train``,
    ``min_train_nodes``, ``min_available_nodes``.
    """

    def _init_nodes(self) -> None:
        self._rank: dict[int, int] = {}
        self._capacity: dict[int, float] = {}  # capacities the nodes declared (node config "capacity")
        self._labels: dict[int, tuple[int, ...]] = {}  # labels the nodes reported holding (label split)
        self._order: list[int] = []
        self._unranked: set[int] = set()
        self._said_tiers_by_order = False

    @property
    def declared_capacities(self) -> dict[int, float]:
        """Node id → the capacity it declared in its node config (``capacity``)."""
        return dict(self._capacity)

    @property
    def node_labels(self) -> dict[int, tuple[int, ...]]:
        """Node id → the labels it reported holding (``labels`` in its query reply, sorted);
        a node absent here reported none and holds every label."""
        return dict(self._labels)

    #: Number of classes the reported ``labels`` are checked against (the output layer's
    #: size, set by a strategy with HeteroFL's label split); None: unchecked.
    label_classes: int | None = None

    def order_nodes(self, grid: Grid, nodes: list[int]) -> list[int]:
        """``nodes`` sorted by reported ``partition-id`` (asked once per node), then id.

        The same reply's ``capacity`` and ``labels`` are kept (:attr:`declared_capacities`,
        :attr:`node_labels`); malformed ``labels`` (not a non-empty list of distinct ints in
        ``[0, label_classes)``) are refused with a warning naming the key and the node,
        which then counts as holding every label."""
        unknown = [n for n in nodes if n not in self._rank and n not in self._unranked]
        if unknown and self.order_by_partition:
            ask = RecordDict({self.configrecord_key: ConfigRecord({"fl-subnet-query": "partition-id"})})
            replies = grid.send_and_receive(
                [Message(content=ask, message_type=MessageType.QUERY, dst_node_id=n) for n in unknown],
                timeout=self.query_timeout)
            for msg in replies:
                pid = cap = labels = None
                if not msg.has_error():
                    for record in msg.content.metric_records.values():
                        pid = record.get("partition-id", pid)
                        cap = record.get("capacity", cap)
                        labels = record.get(LABELS_KEY, labels)
                if labels is not None:
                    try:
                        self._labels[msg.metadata.src_node_id] = check_labels(labels, self.label_classes,
                                                                              key=LABELS_KEY)
                    except ValueError as err:
                        log.warning("order_nodes: node %d: refused its reported labels (it counts as holding every "
                                    "label): %s", msg.metadata.src_node_id, err)
                if isinstance(pid, int) and not isinstance(pid, bool):
                    self._rank[msg.metadata.src_node_id] = pid
                if isinstance(cap, (int, float)) and not isinstance(cap, bool) and 0 < cap <= 1:
                    self._capacity[msg.metadata.src_node_id] = float(cap)
            self._unranked.update(n for n in unknown if n not in self._rank)  # asked once only
            log.info("order_nodes: %d of %d nodes reported a partition-id%s",
                     sum(n in self._rank for n in nodes), len(nodes),
                     "" if all(n in self._rank for n in nodes) else
                     " (the others are ordered by node id; a ClientApp without fl-subnet's query "
                     "handler cannot answer: leave order_by_partition off)")
        big = 1 << 62
        return sorted(nodes, key=lambda n: (self._rank.get(n, big), n))

    def sample_train_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """Deterministic node sample: ordered nodes (:meth:`order_nodes`), permuted by (seed, round)."""
        wanted = self.num_train_nodes
        if wanted is None:
            n = int(len(list(grid.get_node_ids())) * self.fraction_train)
            wanted = max(n, self.min_train_nodes)
        need = max(self.min_available_nodes, wanted)
        nodes = self.wait_for_nodes(grid, need)
        nodes = self.order_nodes(grid, nodes)
        self._order = nodes
        order = torch.randperm(len(nodes), generator=generator_for(self.seed, server_round, -2))
        return [nodes[i] for i in order[:wanted].tolist()]

    def capacity_of(self, node: int) -> float | None:
        """The node's capacity: the one it declared (node config ``capacity``, reported to
        the ordering query), else ``capacity_tiers[i mod len]`` for its position ``i`` in the
        ordered node list (a simulation's distribution of tiers), else None (the sampler's
        default)."""
        if node in self._capacity:
            return self._capacity[node]
        if self.capacity_tiers and node in self._order:
            if node not in self._rank:
                self._say_tiers_by_node_order()
            return self.capacity_tiers[self._order.index(node) % len(self.capacity_tiers)]
        return None

    def _say_tiers_by_node_order(self) -> None:
        """Log once per strategy that tiers go to nodes that reported no partition-id by node
        order, and how a node declares its own capacity."""
        if self._said_tiers_by_order:
            return
        self._said_tiers_by_order = True
        why = ("some nodes did not answer the partition-id query (a ClientApp without an @app.query() handler)"
               if self.order_by_partition else
               "the nodes did not answer the partition-id query (order_by_partition=False: they were not asked, "
               "since a plain ClientApp has no @app.query() handler)")
        log.warning(
            "%s: %s, so capacity tiers %s are assigned by node order (node i of the sorted node ids gets tier "
            "i mod %d; Flower node ids are random per run in a simulation). To declare a node's capacity, set "
            "it in its node config (--node-config \"partition-id=0 capacity=0.25\"), answer the query with "
            "@app.query() returning fl_subnet.clients.partition_reply(msg, context) (fl-subnet's own ClientApp "
            "does) and pass order_by_partition=True",
            type(self).__name__, why, list(self.capacity_tiers), len(self.capacity_tiers))

    def wait_for_nodes(self, grid: Grid, need: int) -> list[int]:
        """The connected node ids once at least ``need`` are connected.

        Logs once what it waits for (and every 30 s), and gives up after
        :attr:`node_wait_timeout` seconds.

        Raises
        ------
        NotEnoughNodes
            Naming the number of nodes needed and connected, after the timeout.
        """
        t0 = last = time.monotonic()
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < need:
            log.warning("%s needs %d nodes per round (%s); %d connected: waiting up to %.0f s "
                        "(node-wait-timeout)", type(self).__name__, need, self._need_reason(), len(nodes),
                        self.node_wait_timeout)
        while len(nodes) < need:
            now = time.monotonic()
            if now - t0 >= self.node_wait_timeout:
                raise NotEnoughNodes(
                    f"{type(self).__name__} needs {need} nodes per round ({self._need_reason()}) but only "
                    f"{len(nodes)} connected within {self.node_wait_timeout:.0f} s: start more SuperNodes (a "
                    f"local simulation: flwr run . --federation-config \"num-supernodes={need}\", or flwr "
                    f"federation simulation-config @none/default --num-supernodes {need} for the running "
                    f"SuperLink's later runs), or lower the requirement")
            if now - last >= 30:
                log.info("still waiting for nodes: %d of %d connected", len(nodes), need)
                last = now
            time.sleep(min(1.0, max(0.0, self.node_wait_timeout - (now - t0))))
            nodes = sorted(grid.get_node_ids())
        return nodes

    def _need_reason(self) -> str:
        return f"min_available_nodes={self.min_available_nodes}"

