"""The wire contract between the ServerApp and the ClientApp (DESIGN.md section 4).

Server -> client: `arrays` (global B + heads), `config` (the link spec, whole; the global
round, its lr and training keys; the links digest), `links` (the merged links the node
lacks).
Client -> server: `arrays` (trained B + heads), `metrics` (num-examples, loss, time,
bytes), `echo` (run id, chain index, links digest, partition id, A digest), so the server
can reject stale or foreign replies instead of averaging factors made for another A.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message

# Record names in a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
LINKS = "links"
ECHO = "echo"
RECEIVED_EVAL = "received-eval"  # train reply: metrics of the model the client received

# Message type of the server's question "which partition are you?" (strategies/sampling.py)
# and the ClientApp's query action that answers it, with an `echo` record holding only
# PARTITION_ID.
PARTITION_ACTION = "partition"
PARTITION_QUERY = f"query.{PARTITION_ACTION}"

# Keys of the `config` record.
LINK_SPEC = "link-spec"  # the link, whole: contract.link_spec.LinkSpec as compact JSON
GLOBAL_ROUND = "global-round"  # the run's round: 1 .. num-links x rounds-per-link
LINKS_DIGEST = "links-digest"  # the merged links the base is rebuilt from (also echoed)
PROXIMAL_MU = "proximal-mu"  # FedProx puts it there itself
LR = "lr"  # the round's client learning rate, set by the server (server/schedule.py)
# Train config: the node ids that evaluate the received global model on their held-out
# data before training, and reply with its metrics in RECEIVED_EVAL (client-eval
# with-train: one message a round instead of two).
EVALUATE_RECEIVED = "evaluate-received"

# Keys of the `links` record (the blob holds its first position: seedlora.serialize).
LINKS_PREFIX_DIGEST = "prefix-digest"
LINKS_DATA = "data"

# Keys of the reply `metrics` and `echo` records.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_TIME = "train-time"
TRAIN_START = "train-start"  # wall-clock (epoch seconds) when the client began the round
BYTES_UP = "bytes-up"
BYTES_DOWN = "bytes-down"
RUN_ID = "run-id"  # echo: the run the client trained for (its Flower context's)
CHAIN_INDEX = "chain-index"  # echo: the chain index of the link spec it trained
PARTITION_ID = "partition-id"
A_DIGEST = "a-digest"  # echo: seedlora.a_digest of the client's link model (its A's)
SECURE_LINKS = "links-data"  # SecAgg+ fit config: every merged link (server/secure.py)
DP_WEIGHT = "dp-weight"  # 1 from every client under DP: equal weights (strategies/privacy.py)


def record_bytes(message: Message) -> int:
    """Payload bytes of a message: its arrays plus any links blob (0 for an error reply)."""
    if not message.has_content():
        return 0
    content = message.content
    total = sum(r.count_bytes() for r in content.array_records.values())
    if LINKS in content.config_records:
        data = content.config_records[LINKS].get(LINKS_DATA, b"")
        total += len(data) if isinstance(data, bytes) else 0
    return total


def echo_record(
    chain_index: int, links_digest: str, run_id: int, partition_id: int, a_digest: str = ""
) -> ConfigRecord:
    """What a client echoes back so the server can match the reply to its link (the link
    spec's chain index and the links digest it was sent); `a_digest` (`seedlora.a_digest`
    of the model it trained, "" without adapters) lets the server check that the client
    derived the same A from the link's A-spec."""
    return ConfigRecord(
        {
            RUN_ID: run_id,
            CHAIN_INDEX: chain_index,
            LINKS_DIGEST: links_digest,
            PARTITION_ID: partition_id,
            A_DIGEST: a_digest,
        }
    )


def arrays_signature(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every array, the shape a valid reply must have."""
    return {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
