"""A Grid that delivers messages to ClientApps in this process: fast, Ray-free app tests.

It runs the real ServerApp and ClientApp code; only the transport is replaced. A test can
swap a node's app for a faulty one to send bad replies.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 4242


class LocalGrid(Grid):
    """Node ids 101, 102, ...; node i holds partition i of n."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict | None = None):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 0
        self.apps = {101 + i: client_app for i in range(num_nodes)}
        self.contexts = {
            101 + i: Context(
                run_id=RUN_ID,
                node_id=101 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        self.replies: list[Message] = []  # every train reply, for exactness checks
        self.rounds_sent = 0
        self.fail_after: int | None = None  # raise after this many train rounds (crash test)

    def set_run(self, run: Run) -> None:  # pragma: no cover - not used by ServerApps here
        raise NotImplementedError

    @property
    def run(self) -> Run:  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type.startswith("train"):
            if self.fail_after is not None and self.rounds_sent >= self.fail_after:
                raise KeyboardInterrupt("simulated server crash")
            self.rounds_sent += 1
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            try:
                reply = self.apps[node](msg, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - a client error becomes an error reply
                reply = Message(Error(code=0, reason=repr(err)), reply_to=msg)
            if reply is not None:
                replies.append(reply)
                if msg.metadata.message_type.startswith("train"):
                    self.replies.append(reply)
        return replies


def scaled_update(honest: ClientApp, factor: float):
    """A Byzantine client for tests and benchmarks only (no run-config key reaches it):
    it trains honestly, then sends `sent + factor * (trained - sent)`. factor 10 is the
    scaled attack, -1 the sign-flipped one."""
    from contract import protocol as p

    def app(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        if reply.has_error():
            return reply
        sent = msg.content[p.ARRAYS].to_torch_state_dict()
        got = reply.content[p.ARRAYS].to_torch_state_dict()
        reply.content[p.ARRAYS] = ArrayRecord(
            {k: sent[k] + factor * (got[k] - sent[k]) for k in got}
        )
        return reply

    return app
