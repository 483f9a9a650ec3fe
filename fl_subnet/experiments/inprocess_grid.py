"""A synchronous, in-process Flower ``Grid``: no Ray, no network, no threads.

:class:`InProcessGrid` hands every pushed ``Message`` straight to a ``ClientApp``
running in the same process and stores the reply, so ``strategy.start(grid=...)`` runs
deterministically and fast (given a seeded ``random``, which Flower's node sampling
uses).  Messages and contexts cross the "wire" through Flower's protobuf serde, as in a
real deployment: a node never shares objects with the server or with other nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.serverapp import Grid
from flwr.supercore.date import now
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

logger = logging.getLogger(__name__)

DEFAULT_RUN_ID = 1
FIRST_NODE_ID = 1001


def _wire_copy(message: Message) -> Message:
    """Return ``message`` as the receiving side would rebuild it from the wire."""
    return message_from_proto(message_to_proto(message))


class InProcessGrid(Grid):
    """Deliver messages to a ``ClientApp`` in this process, one at a time.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    num_nodes : int
        Number of nodes (at least 1).
    node_configs : list of dict, optional
        One node config per node.  Default for node ``i``:
        ``{"partition-id": i, "num-partitions": num_nodes}``.
    run_config : dict, optional
        The run config every node's ``Context`` carries (default ``{}``).
    node_ids : list of int, optional
        Node ids, unique and not ``1`` (the SuperLink's).  Default ``1001, 1002, ...``.

    Notes
    -----
    - Constructing the grid sets Flower's process-global ``TaskIdentity`` (run id, the
      SuperLink's node id), which ``Message(content, dst_node_id, message_type)`` needs.
    - Each node keeps one ``Context`` across rounds.  The ``ClientApp`` works on a
      copy, committed only if it returns a valid reply, like a SuperNode.  A raising
      ``ClientApp`` (or a reply not built with ``reply_to=message``) yields an error
      reply (``has_error()``), code ``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``.
    - Replies exist as soon as ``push_messages`` returns; ``timeout`` is ignored.
    - Flower's ``sample_nodes`` waits forever for ``min_available_nodes`` nodes:
      keep a strategy's minimums at most ``num_nodes``.
    """

    def __init__(  # pylint: disable=too-many-arguments
        self,
        client_app: ClientApp,
        num_nodes: int,
        node_configs: list[dict] | None = None,
        run_config: dict | None = None,
        node_ids: list[int] | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
        default_ids = range(FIRST_NODE_ID, FIRST_NODE_ID + num_nodes)
        ids = list(default_ids if node_ids is None else node_ids)
        if len(ids) != num_nodes or len(set(ids)) != num_nodes:
            raise ValueError(f"node_ids must be {num_nodes} unique ints, got {ids}")
        if any(not isinstance(n, int) or n <= 0 or n == SUPERLINK_NODE_ID for n in ids):
            raise ValueError(f"node_ids must be positive ints other than 1, got {ids}")
        if node_configs is None:
            n = num_nodes
            node_configs = [{"partition-id": i, "num-partitions": n} for i in range(n)]
        if len(node_configs) != num_nodes:
            raise ValueError(f"{len(node_configs)} node_configs for {num_nodes} nodes")
        self._app = client_app
        self._node_ids = ids
        self._run = Run.create_empty(DEFAULT_RUN_ID)
        self._run.override_config = dict(run_config or {})
        self._contexts = {
            node_id: Context(
                run_id=DEFAULT_RUN_ID,
                node_id=node_id,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for node_id, cfg in zip(ids, node_configs, strict=True)
        }
        self._replies: dict[str, Message] = {}
        self._num_ids = 0
        self._set_task_identity()

    def _set_task_identity(self) -> None:
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = self._run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        """Adopt ``run`` (its ``run_id`` goes to every node's ``Context``)."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be a Run, got {type(run).__name__}")
        self._run = run
        for context in self._contexts.values():
            context.run_id = run.run_id
        self._set_task_identity()

    @property
    def run(self) -> Run:
        """Run information (a copy)."""
        return Run(**vars(self._run))

    def get_node_ids(self) -> Iterable[int]:
        """Return the node ids, always in the same order."""
        return list(self._node_ids)

    def get_context(self, node_id: int) -> Context:
        """Return the live, persistent ``Context`` of ``node_id`` (for inspection)."""
        return self._contexts[node_id]

    def create_message(  # pylint: disable=too-many-arguments,R0917
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create an instruction message (deprecated in Flower: use ``Message``)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def _next_id(self) -> str:
        self._num_ids += 1
        return f"{self._num_ids:064x}"

    def _deliver(self, message: Message) -> Message:
        """Run the destination node's ``ClientApp`` on ``message``; never raises."""
        node_id = message.metadata.dst_node_id
        received = _wire_copy(message)
        received.metadata.delivered_at = now().isoformat()
        context = context_from_proto(context_to_proto(self._contexts[node_id]))
        try:
            reply = self._app(received, context)
            if not isinstance(reply, Message):
                raise TypeError(f"ClientApp returned a {type(reply).__name__}")
            meta = reply.metadata
            if meta.reply_to_message_id != message.metadata.message_id or (
                meta.src_node_id != node_id
            ):
                raise ValueError("reply was not built with Message(..., reply_to=msg)")
            reply = _wire_copy(reply)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            logger.exception("ClientApp on node %d raised", node_id)
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
            reply = Message(error, reply_to=received)
        else:
            self._contexts[node_id] = context
        reply.metadata.__dict__["_message_id"] = self._next_id()
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now and return the ids to pull its reply with.

        Raises
        ------
        ValueError
            If a message is a reply, has another run id, or targets an unknown node.
            (A message pushed before is accepted and gets a new id, as in Flower.)
        """
        message_ids: list[str] = []
        for message in messages:
            meta = message.metadata
            if meta.reply_to_message_id or meta.ttl <= 0:
                raise ValueError(f"Not a fresh instruction message: {meta}")
            if meta.run_id != self._run.run_id:
                raise ValueError(
                    f"Message run_id {meta.run_id} != grid run_id {self._run.run_id} "
                    "(was it created while another grid was active?)"
                )
            if meta.dst_node_id not in self._contexts:
                raise ValueError(f"Unknown dst_node_id {meta.dst_node_id}")
            meta.__dict__["_message_id"] = message_id = self._next_id()
            self._replies[message_id] = self._deliver(message)
            message_ids.append(message_id)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return (and forget) the replies to ``message_ids`` not yet pulled."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
    ) -> Iterable[Message]:
        """Push ``messages`` and return their replies, in push order.

        ``timeout`` is accepted for interface compatibility and ignored: delivery
        is synchronous, so every reply (possibly an error reply) is already there.
        """
        return self.pull_messages(self.push_messages(messages))


__all__ = ["InProcessGrid"]
