"""Faulty clients for tests and benchmarks: production code never imports this package."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from contract import protocol as p


def scaled_update(honest: ClientApp, factor: float):
    """A Byzantine client for tests and benchmarks only (no run-config key reaches it):
    it trains honestly, then sends `sent + factor * (trained - sent)`. factor 10 is the
    scaled attack, -1 the sign-flipped one."""

    def app(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        if reply.has_error() or not msg.metadata.message_type.startswith("train"):
            return reply
        sent = msg.content[p.ARRAYS].to_torch_state_dict()
        got = reply.content[p.ARRAYS].to_torch_state_dict()
        reply.content[p.ARRAYS] = ArrayRecord(
            {k: sent[k] + factor * (got[k] - sent[k]) for k in got}
        )
        return reply

    return app
