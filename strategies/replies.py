"""The reply pipeline: what every reply of a round goes through before a strategy sees it.

Each reply, one step after the other (a step returns the reply, its arrays possibly
rewritten in place, or raises `ReplyRejected` with the reason):

    check_envelope   client error, echo (run id, chain index, links digest), metrics
    Unpack           train only: compressed or reduced-rank upload -> full float32 state
    check_arrays     train only: keys, shapes, dtypes and finite values of what was sent

The envelope comes first so that nothing foreign is ever decoded. A rejected reply is
logged with its node id and reason. `ReplyPipeline.check` runs the steps on one reply,
as it arrives (strategies/intake.py); a round that buffers its replies then sorts the
passed ones by partition id (so that sums are reproducible) and puts them through the
outlier screen (strategies/outliers.py), which may flag, drop or clip (`verdict`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from logging import INFO, WARNING

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log

from contract import protocol as p

from .ledger import Rejection
from .outliers import OutlierScreen
from .rejections import ReplyRejected
from .uploads import Unpack
from .validation import Expectation, check_arrays, check_envelope

Step = Callable[[Message], Message]  # a reply in, the reply out, or ReplyRejected
Screen = Callable[[list[Message]], tuple[list[Message], list[dict]]]  # (kept, outliers)


@dataclass
class Verdict:
    """What the pipeline made of one round's replies."""

    accepted: list[Message]  # passed every step and the screen, sorted: to aggregate
    rejected: list[Rejection]  # failed a step, in arrival order
    checked: list[int]  # nodes whose reply passed every step (screened out or not)
    outliers: list[dict] = field(default_factory=list)  # node, norm, bound, action

    @property
    def rejected_nodes(self) -> list[int]:
        """Nodes whose own reply was rejected (not the SuperLink answering for a lost one)."""
        return [r.node_id for r in self.rejected if r.node_id != SUPERLINK_NODE_ID]


def _log_rejection(rejection: Rejection) -> None:
    if rejection.node_id == SUPERLINK_NODE_ID:  # Flower's error for a node it could not reach
        # the lost node itself is named by note_lost (a warning); this is its echo
        log(INFO, "the SuperLink answered for a lost node: %s", rejection.reason)
    else:
        log(WARNING, "rejected reply from node %s: %s", rejection.node_id, rejection.reason)


def _partition_order(message: Message) -> tuple[int, int]:
    return (message.content[p.ECHO].get(p.PARTITION_ID, 0), message.metadata.src_node_id)


@dataclass(frozen=True)
class ReplyPipeline:
    """The steps every reply goes through, then the screen over the round's survivors."""

    steps: Sequence[Step]
    screen: Screen | None = None

    def check(self, reply: Message) -> Message | Rejection:
        """One reply through every step: the reply (its arrays possibly rewritten), or its
        rejection, logged."""
        node = reply.metadata.src_node_id
        try:
            for step in self.steps:
                reply = step(reply)
        except ReplyRejected as err:
            rejection = Rejection(node, err.reason)
            _log_rejection(rejection)
            return rejection
        return reply

    def verdict(self, passed: list[Message], rejected: list[Rejection]) -> Verdict:
        """The round's verdict once every reply went through `check`: the passed ones
        sorted by partition id, then screened."""
        passed = sorted(passed, key=_partition_order)
        checked = [m.metadata.src_node_id for m in passed]
        if self.screen is None:
            return Verdict(passed, rejected, checked)
        kept, outliers = self.screen(passed)
        return Verdict(kept, rejected, checked, outliers)

    def __call__(self, replies: Iterable[Message]) -> Verdict:
        passed, rejected = [], []
        for reply in replies:
            out = self.check(reply)
            (rejected if isinstance(out, Rejection) else passed).append(out)
        return self.verdict(passed, rejected)


def train_pipeline(exp: Expectation, unpack: Unpack, screen: OutlierScreen) -> ReplyPipeline:
    """Train replies: envelope, unpacking (when the run needs it), arrays; then the screen."""
    steps: list[Step] = [partial(check_envelope, exp=exp)]
    if unpack.needed:
        steps.append(unpack)
    steps.append(partial(check_arrays, exp=exp))
    return ReplyPipeline(steps, screen)


def evaluate_pipeline(exp: Expectation) -> ReplyPipeline:
    """Evaluate replies carry no arrays: the envelope is all there is to check."""
    return ReplyPipeline([partial(check_envelope, exp=exp)])


def _no_examples(message: Message) -> bool:
    """An evaluate reply that honestly reports zero examples (nothing to weigh, no fault)."""
    if message.has_error() or p.METRICS not in message.content.metric_records:
        return False
    return message.content[p.METRICS].get(p.NUM_EXAMPLES) == 0


def without_empty_evaluations(replies: Iterable[Message]) -> list[Message]:
    """The evaluate replies that have something to weigh; the others are logged, not
    rejected (e.g. a client whose packages have no held-out files)."""
    kept = []
    for message in replies:
        if _no_examples(message):
            log(INFO, "node %s has no evaluation data", message.metadata.src_node_id)
        else:
            kept.append(message)
    return kept


def own_rejections(rejected: Sequence[Rejection], lost: Sequence[int]) -> list[Rejection]:
    """The rejections of the nodes' own replies: the SuperLink's error replies (node id 1)
    standing for nodes already named lost are not listed again, one per lost node."""
    unmatched, out = len(lost), []
    for rejection in rejected:
        if rejection.node_id == SUPERLINK_NODE_ID and unmatched > 0:
            unmatched -= 1
            continue
        out.append(rejection)
    return out


def note_lost(sent_nodes: Iterable[int], replied: Iterable[int], global_round: int) -> list[int]:
    """The sampled nodes that sent nothing of their own (crashed, cut off, or past
    round-timeout; Flower's 'node unavailable' error comes from the SuperLink's id), sorted
    and logged: the round goes on with the others, and a late reply is never counted in a
    later round. `replied`: the nodes a reply came from."""
    lost = sorted(set(sent_nodes) - set(replied))
    if lost:
        log(
            WARNING,
            "round %d: no reply from node(s) %s (crashed, offline or past round-timeout)",
            global_round,
            ", ".join(map(str, lost)),
        )
    return lost
