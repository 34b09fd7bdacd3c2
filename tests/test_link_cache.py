"""The chain's running digests and the client's link cache: one file per link, catch-up from
any prefix writes only the links a node lacked, a damaged entry is a miss, never a wrong base."""

import pytest
import torch
from flwr.app import ConfigRecord

from client.links import LinkCache
from contract import protocol as p
from seedlora import EMPTY_DIGEST, ASpec, Chain, Link, links_digest
from seedlora.serialize import link_to_bytes, links_to_bytes

N = 5


def make_links(n: int = N, seed: int = 0) -> list[Link]:
    """`n` links of two layers (a: 6 -> 4, b: 4 -> 6) at rank 2, chain index 0 first."""
    gen = torch.Generator().manual_seed(seed)
    links = []
    for c in range(n):
        specs = (ASpec("circulant", 0, c, 2, "a", 6, 4), ASpec("circulant", 0, c, 2, "b", 4, 6))
        factors = {"a": torch.randn(4, 2, generator=gen), "b": torch.randn(6, 2, generator=gen)}
        links.append(Link(4.0, specs, factors))
    return links


def record(links, start: int) -> ConfigRecord:
    """What the server sends a node that holds the first `start` links (strategies/outgoing.py)."""
    return ConfigRecord(
        {
            p.LINKS_PREFIX_DIGEST: links_digest(links[:start]),
            p.LINKS_DATA: links_to_bytes(links[start:], start),
        }
    )


def files(cache: LinkCache) -> set[str]:
    return {f.name for f in cache.dir.iterdir()} if cache.dir.exists() else set()


def test_a_chain_keeps_the_digest_of_every_prefix():
    links = make_links()
    chain = Chain(links[:2])
    for link in links[2:]:
        chain.append(link)
    assert [chain.prefix_digest(k) for k in range(N + 1)] == [
        links_digest(links[:k]) for k in range(N + 1)
    ]
    assert chain.digest == links_digest(links) == links_digest(chain)
    assert chain.prefix_digest(0) == EMPTY_DIGEST and Chain().digest == EMPTY_DIGEST
    part = chain.prefix(3)
    part.append(links[0])  # a prefix is a chain of its own: the original is unchanged
    assert len(chain) == N and chain.digest == links_digest(links)
    assert part.digest == links_digest([*links[:3], links[0]])
    assert Chain.of(chain) is chain and Chain.of(links).digest == chain.digest
    assert chain[1:3] == links[1:3] and list(chain) == links
    with pytest.raises(IndexError):
        chain.prefix_digest(N + 1)


@pytest.mark.parametrize("held", range(N + 1))
@pytest.mark.parametrize("memory", ["process", "disk"])
def test_catch_up_from_any_prefix_appends_only_the_missing_links(tmp_path, held, memory):
    """A node holding the first `held` links is sent the rest; it writes one file per link it
    lacked. `disk`: a fresh process (nothing in memory) finds the prefix on disk."""
    links = make_links()
    mem: dict = {}
    cache = LinkCache(tmp_path, "base", memory=mem)
    if held:
        cache.resolve(record(links[:held], 0), links_digest(links[:held]))
    before = files(cache)
    assert len(before) == held
    if memory == "disk":
        cache = LinkCache(tmp_path, "base", memory={})
    chain = cache.resolve(record(links, held), links_digest(links))
    assert chain.digest == links_digest(links) and len(chain) == N
    assert before < files(cache) or held == N
    assert len(files(cache)) == N  # one file per link, whatever the path
    fresh = LinkCache(tmp_path, "base", memory={})  # a restart rebuilds it from disk alone
    assert fresh.resolve(None, links_digest(links)).digest == links_digest(links)
    for k in range(N + 1):
        assert fresh.load(links_digest(links[:k])).digest == links_digest(links[:k])


def test_a_known_chain_reads_no_file_and_a_node_sent_more_than_it_lacks_is_fine(tmp_path):
    links = make_links()
    cache = LinkCache(tmp_path, "base", memory={})
    cache.resolve(record(links[:3], 0), links_digest(links[:3]))
    for path in cache.dir.iterdir():  # from now on only memory can answer
        path.unlink()
    assert cache.resolve(None, links_digest(links[:3])).digest == links_digest(links[:3])
    chain = cache.resolve(record(links, 1), links_digest(links))  # resent from link 1 on
    assert chain.digest == links_digest(links)
    assert len(files(cache)) == 4  # links 1..4: the ones in the record not on disk


@pytest.mark.parametrize("damage", ["garbage", "truncate", "tampered", "wrong-position"])
def test_a_damaged_cache_entry_is_a_miss_never_a_wrong_base(tmp_path, damage):
    links = make_links()
    cache = LinkCache(tmp_path, "base", memory={})
    cache.resolve(record(links, 0), links_digest(links))
    victim = cache.dir / f"{links_digest(links[:3])}.safetensors"  # link 2
    data = victim.read_bytes()
    if damage == "garbage":
        victim.write_bytes(b"\x00" * 64)
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "tampered":  # at its place, but its factors do not hash to its name
        other = make_links(seed=1)[2]
        victim.write_bytes(link_to_bytes(other, 2, links_digest(links[:2])))
    else:  # link 3's file under link 2's name: a file claiming another position
        victim.write_bytes((cache.dir / f"{links_digest(links[:4])}.safetensors").read_bytes())
    fresh = LinkCache(tmp_path, "base", memory={})
    assert fresh.load(links_digest(links)) is None
    assert not victim.exists()  # removed: the next catch-up writes it again
    with pytest.raises(LookupError):
        fresh.resolve(None, links_digest(links))
    with pytest.raises(LookupError, match="prefix not cached"):
        fresh.resolve(record(links, 4), links_digest(links))
    assert fresh.load(links_digest(links[:2])).digest == links_digest(links[:2])  # still good
    chain = fresh.resolve(record(links, 2), links_digest(links))  # the server resends from 2
    assert chain.digest == links_digest(links) and victim.exists()


def test_received_links_that_do_not_hash_to_the_digest_are_an_error(tmp_path):
    links, others = make_links(), make_links(seed=1)
    cache = LinkCache(tmp_path, "base", memory={})
    with pytest.raises(ValueError, match="do not hash"):
        cache.resolve(record(others, 0), links_digest(links))
    assert files(cache) == set()  # nothing stored from a bad catch-up
