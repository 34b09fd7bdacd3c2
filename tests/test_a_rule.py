"""The A rule (seedlora.spec.A_RULE) is recorded wherever A is derived from a record: a link
header (and so its digest), a checkpoint, a client's link cache, the A digest a client
echoes. A record made under another rule, or none (the legacy torch generator), is refused
with an ARuleError that says "A rule" and what to do; circulant links draw nothing and are
the same under every rule."""

import pytest
import torch

from client.links import LinkCache
from seedlora import ASpec, Chain, Link, links_digest
from seedlora.chain import A_RULE_KEY
from seedlora.serialize import (
    CorruptFileError,
    link_from_bytes,
    link_to_bytes,
    links_from_bytes,
    links_to_bytes,
    state_to_bytes,
)
from seedlora.spec import A_RULE, ARuleError, check_a_rule
from server import checkpoint
from server.state import ChainState

# links_digest of two circulant links (`make(kind="circulant")`) by the code before the A
# rule was recorded: their headers and digests have not changed.
CIRCULANT_DIGEST = "aa59f331e6231ad276831afee9bf0aadf8d9e22182275795e70f9b3cd6dacf66"


def link(kind: str, c: int) -> Link:
    specs = (ASpec(kind, 0, c, 2, "a", 6, 4), ASpec(kind, 0, c, 2, "b", 4, 6))
    factors = {"a": torch.arange(8.0).reshape(4, 2), "b": torch.arange(12.0).reshape(6, 2)}
    return Link(4.0, specs, factors)


def make(kind: str = "gaussian", n: int = 2) -> list[Link]:
    return [link(kind, c) for c in range(n)]


def legacy_header(link: Link, rule: str | None = None) -> dict:
    """The header the code before the A rule wrote (no rule), or one naming `rule`."""
    header = {k: v for k, v in link.header().items() if k != A_RULE_KEY}
    return header if rule is None else {**header, A_RULE_KEY: rule}


def legacy_file(link: Link, index: int, prefix: str, rule: str | None = None) -> bytes:
    """`link_to_bytes` as the code before the A rule wrote it."""
    meta = {"index": index, "prefix-digest": prefix, "link": legacy_header(link, rule)}
    return state_to_bytes({k: v.float() for k, v in link.factors.items()}, meta)


@pytest.mark.parametrize("kind", ["gaussian", "random-block"])
def test_a_link_that_draws_records_the_rule_and_it_is_in_its_digest(kind, monkeypatch):
    from seedlora import chain

    new = link(kind, 0)
    assert new.header()[A_RULE_KEY] == A_RULE
    assert Link.from_header(new.header(), new.factors).header() == new.header()
    digest = links_digest([new])
    monkeypatch.setattr(chain, "A_RULE", "exact-v9")  # the same link under another rule
    assert links_digest([new]) != digest


def test_circulant_links_are_unchanged():
    """No A drawn: no rule in the header, and the digest of the code before the record."""
    links = make("circulant")
    assert A_RULE_KEY not in links[0].header()
    assert links_digest(links) == CIRCULANT_DIGEST
    start, back = links_from_bytes(links_to_bytes(links))
    assert start == 0 and links_digest(back) == CIRCULANT_DIGEST


@pytest.mark.parametrize("kind", ["gaussian", "random-block"])
@pytest.mark.parametrize(("rule", "named"), [(None, "torch-v1"), ("exact-v1", "exact-v1")])
def test_a_link_made_under_another_rule_is_refused(kind, rule, named):
    old = link(kind, 3)
    with pytest.raises(ARuleError) as caught:
        Link.from_header(legacy_header(old, rule), old.factors)
    message = str(caught.value)
    assert f"link 3 was made under A rule {named!r}" in message
    assert f"A rule {A_RULE!r}" in message and kind in message
    assert "start a fresh run" in message and "link cache" in message
    # a file or a payload of it: the same refusal, not "corrupt"
    with pytest.raises(ARuleError):
        link_from_bytes(legacy_file(old, 0, "x", rule))
    payload = state_to_bytes(
        {f"0/{k}": v for k, v in old.factors.items()},
        {"start": 0, "links": [legacy_header(old, rule)]},
    )
    with pytest.raises(ARuleError):
        links_from_bytes(payload)


def test_a_legacy_circulant_link_still_loads():
    old = link("circulant", 1)
    assert Link.from_header(legacy_header(old), old.factors).header() == old.header()
    assert link_from_bytes(legacy_file(old, 0, "x"))[2].header() == old.header()


def test_check_a_rule():
    check_a_rule(A_RULE, ["gaussian"], "x")
    check_a_rule(None, ["circulant"], "x")  # no A drawn: any rule
    check_a_rule("", [], "x")
    with pytest.raises(ARuleError, match="x was made under A rule 'torch-v1'.*; do this"):
        check_a_rule("", ["circulant", "gaussian"], "x", "do this")


def state(links: list[Link], a_rule: str = A_RULE) -> ChainState:
    return ChainState({"rank": 2}, links, {"a.lora_B": torch.zeros(4, 2)}, a_rule=a_rule)


def test_a_checkpoint_records_its_rule(tmp_path):
    checkpoint.save(tmp_path, state(make()))
    assert checkpoint.load(tmp_path).a_rule == A_RULE
    checkpoint.save(tmp_path, state([], a_rule=""))  # what a checkpoint before it reads as
    assert checkpoint.load(tmp_path).a_rule == ""


def test_a_checkpoint_whose_link_log_holds_an_old_rule_link_is_refused(tmp_path):
    """Not read as a damaged checkpoint (no fallback to .prev): ARuleError, naming the link."""
    links = Chain(make())
    checkpoint.save(tmp_path, state(links))
    path = checkpoint.link_path(tmp_path, 1)
    path.write_bytes(legacy_file(links[1], 1, links.prefix_digest(1)))
    with pytest.raises(ARuleError, match="link 1 was made under A rule 'torch-v1'"):
        checkpoint.load(tmp_path)


def test_a_cached_link_of_the_old_rule_is_refused(tmp_path):
    """A node whose cache holds a link made under the old rule, named by the digest a server
    of that rule sends: refused with the rule named, never a silent other base."""
    links = Chain(make())
    cache = LinkCache(tmp_path, "base", memory={})
    cache.store(links)
    name = cache.dir / f"{links.digest}.safetensors"
    name.write_bytes(legacy_file(links[1], 1, links.prefix_digest(1)))
    with pytest.raises(ARuleError, match="A rule 'torch-v1'"):
        LinkCache(tmp_path, "base", memory={}).load(links.digest)
    name.write_bytes(b"garbage")  # damage is still a plain miss
    assert LinkCache(tmp_path, "base", memory={}).load(links.digest) is None
    with pytest.raises(CorruptFileError):
        link_from_bytes(b"garbage")


def test_link_files_round_trip_with_the_rule():
    new = link("gaussian", 0)
    index, prefix, back = link_from_bytes(link_to_bytes(new, 0, "p"))
    assert (index, prefix) == (0, "p") and back.header()[A_RULE_KEY] == A_RULE
    assert back.digest("p") == new.digest("p")
