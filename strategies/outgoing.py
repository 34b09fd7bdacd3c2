"""What goes out to the nodes: the link's config on every message, and the links a node
lacks (link catch-up).

A node rebuilds the current global base from the merged links (DESIGN.md section 3), so
every message carries those it does not hold yet: `node_links` (node id -> number of
links it is known to hold) is the server's, shared by all links of the run. A node
whose reply passed the checks holds every link; a node whose reply was rejected is sent
every link again next time (cheap, and always safe).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict

from contract import protocol as p
from contract.link_spec import LinkSpec
from seedlora.chain import Chain
from seedlora.serialize import links_to_bytes


class Outgoing:
    """Decorates the inner strategy's messages for one chain link and tracks catch-up."""

    def __init__(self, links: Chain, spec: LinkSpec, node_links: dict[int, int]):
        self.links = links  # merged so far: the links digest covers them all
        self.spec = spec.to_wire()  # the link, serialized once
        self.node_links = node_links
        self._blobs: dict[int, bytes] = {}  # first missing link -> serialized links

    def links_record(self, node_id: int) -> ConfigRecord:
        """The links `node_id` lacks (all of them for a node never seen), serialized once
        per link for each first missing position; the prefix digest is the chain's."""
        start = min(self.node_links.get(node_id, 0), len(self.links))
        if start not in self._blobs:
            self._blobs[start] = links_to_bytes(self.links[start:], start)
        return ConfigRecord(
            {
                p.LINKS_PREFIX_DIGEST: self.links.prefix_digest(start),
                p.LINKS_DATA: self._blobs[start],
            }
        )

    def decorate(self, messages: Iterable[Message], global_round: int) -> list[Message]:
        """Copy each message with the link spec, the global round, the links digest and the
        node's missing links added (the config keys the inner strategy set are kept)."""
        out = []
        for msg in messages:
            content = msg.content
            config = ConfigRecord(dict(content[p.CONFIG]))
            config[p.LINK_SPEC] = self.spec
            config[p.GLOBAL_ROUND] = global_round
            config[p.LINKS_DIGEST] = self.links.digest
            record = RecordDict(
                {
                    p.ARRAYS: content[p.ARRAYS],
                    p.CONFIG: config,
                    p.LINKS: self.links_record(msg.metadata.dst_node_id),
                }
            )
            out.append(
                Message(
                    content=record,
                    dst_node_id=msg.metadata.dst_node_id,
                    message_type=msg.metadata.message_type,
                )
            )
        return out

    def note_replies(self, checked: Iterable[int], rejected: Iterable[int]) -> None:
        """After a round: the `checked` nodes hold every link; resend all to `rejected`."""
        for node in rejected:
            self.node_links[node] = 0
        for node in checked:
            self.node_links[node] = len(self.links)
