"""Run a Flower ServerApp and ClientApp in this process, through Flower's public callables (no Ray).

Flower's simulation engine (``flwr run`` with a simulation federation, or
``flwr.simulation.run_simulation``) needs Ray (``pip install "flwr[simulation]"``).
:func:`run_inprocess` runs the same two objects without it: the ServerApp is called
as ``server_app(grid, context)``, every message it sends reaches the ClientApp as
``client_app(message, context)`` — mods included — and every message, both ways,
goes through Flower's wire format (protobuf, ``flwr.common.serde``), so no object
is shared between the server and a client, exactly as over the network.

Node ids are ``10_000 + partition-id``; each node keeps its ``Context`` (node config
``partition-id``/``num-partitions`` like Flower's simulation, plus ``node_config``)
across rounds. Clients run one after another; FedAvg's node sampling uses Python's
``random``, which ``seed`` seeds.
"""

from __future__ import annotations

import contextlib
import random
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

NODE_ID_BASE = 10_000
#: Flower's node id of the server side (``flwr.common.constant.SUPERLINK_NODE_ID``)
SERVER_NODE_ID = 1


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = SERVER_NODE_ID, task_id: int = 1) -> Iterator[None]:
    """Flower's process-wide ``TaskIdentity`` (which ``Message(...)`` reads) set for the block, restored after.

    Flower's own runtimes set it before they call a ServerApp (``flwr.server.compat.app``);
    the previous values are put back, so a process that is itself a Flower task is unaffected.
    """
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _grid_base() -> type:
    from flwr.serverapp import Grid

    return Grid


def _wire(msg: Any, *, message_id: str | None = None) -> Any:
    """``msg`` through Flower's protobuf serialisation (a fresh object), with a message id set."""
    from flwr.common.serde import message_from_proto, message_to_proto

    proto = message_to_proto(msg)
    if message_id is not None:
        proto.metadata.message_id = message_id
    return message_from_proto(proto)


def make_grid(client_app: Any, contexts: dict[int, Any], run_id: int = 1) -> Any:
    """A Flower ``Grid`` that delivers every message to ``client_app`` in this process."""
    from flwr.supercore.run import Run

    Grid = _grid_base()

    class InProcessGrid(Grid):  # type: ignore[misc, valid-type]
        """Flower's ``Grid`` interface over a ClientApp called in this process."""

        def __init__(self) -> None:
            self._run = Run.create_empty(run_id)
            self._replies: dict[str, Any] = {}
            self.messages_sent = 0

        def set_run(self, run: Any) -> None:
            self._run = run

        @property
        def run(self) -> Any:
            return self._run

        def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                           ttl: float | None = None) -> Any:
            from flwr.app import Message

            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self) -> Iterable[int]:
            return list(contexts)

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            ids = []
            for msg in messages:
                node = msg.metadata.dst_node_id
                if node not in contexts:
                    raise ValueError(f"no node {node} in this in-process federation")
                mid = uuid.uuid4().hex
                received = _wire(msg, message_id=mid)
                reply = client_app(received, contexts[node])
                self._replies[mid] = _wire(reply, message_id=uuid.uuid4().hex)
                self.messages_sent += 1
                ids.append(mid)
            return ids

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
            return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

        def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
            return list(self.pull_messages(self.push_messages(messages)))

    return InProcessGrid()


def run_inprocess(server_app: Any, client_app: Any, num_supernodes: int, *,
                  run_config: dict[str, Any] | None = None, node_config: dict[str, Any] | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Run ``server_app`` against ``num_supernodes`` nodes running ``client_app``, in this process.

    :param run_config: the run config both apps see (``context.run_config``), as
        ``flwr run --run-config`` would set it.
    :param node_config: extra keys of every node's ``context.node_config`` (e.g.
        ``{"defenda-share-truth": True}``: the nodes consent to audit ground truth).
    :returns: ``{"seconds", "messages", "server_context", "contexts"}``.
    """
    from flwr.app import Context, RecordDict

    random.seed(seed)
    run_config = dict(run_config or {})
    contexts = {NODE_ID_BASE + i: Context(run_id=1, node_id=NODE_ID_BASE + i,
                                          node_config={"partition-id": i, "num-partitions": num_supernodes,
                                                       **(node_config or {})},
                                          state=RecordDict(), run_config=dict(run_config))
                for i in range(num_supernodes)}
    grid = make_grid(client_app, contexts)
    server_context = Context(run_id=1, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                             run_config=run_config)
    t0 = time.perf_counter()
    with task_identity(run_id=1):
        server_app(grid, server_context)
    return {"seconds": time.perf_counter() - t0, "messages": grid.messages_sent, "server_context": server_context,
            "contexts": contexts}
