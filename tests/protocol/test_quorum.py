"""The head upstreams agree on (chain/quorum.py): a quorum by hash with 3 or more, the
ahead bound with 2, and the flags of upstreams whose heads are not used."""

from __future__ import annotations

from chainrelay.chain.head import Header
from chainrelay.chain.quorum import AHEAD, FORK, SYNCING, HeadQuorum


def chain(tag: str, lo: int, hi: int, base: list[Header] | None = None) -> list[Header]:
    """Headers lo..hi whose hashes carry ``tag``, linked by parent hash (to ``base``'s)."""
    out = list(base or [])
    parent = out[-1].hash if out else "0xgenesis"
    for n in range(lo, hi + 1):
        h = Header(n, f"0x{tag}{n}", parent)
        out.append(h)
        parent = h.hash
    return out


MAIN = chain("a", 1, 120)
BY_NUMBER = {h.number: h for h in MAIN}


def q(names: str = "abc", quorum: int = 0, ahead: int = 64) -> HeadQuorum:
    return HeadQuorum(list(names), quorum, ahead, 256)


def test_the_head_is_the_highest_block_a_majority_holds() -> None:
    hq = q()
    hq.saw("a", BY_NUMBER[100])
    assert hq.trusted() is None  # one of three
    hq.saw("b", BY_NUMBER[101])
    got = hq.trusted()
    assert got is not None and got[0] == BY_NUMBER[100]  # b holds 100 as 101's parent
    hq.saw("c", BY_NUMBER[102])
    got = hq.trusted()
    assert got is not None and got[0] == BY_NUMBER[101]  # c holds 101 as 102's parent
    assert hq.flags() == {}


def test_an_upstream_on_its_own_fork_is_flagged_and_moves_nothing() -> None:
    hq = q()
    fork = chain("f", 91, 105, MAIN[:90])  # same chain to 90, then its own
    hq.saw("a", BY_NUMBER[100])
    hq.saw("b", BY_NUMBER[100])
    hq.saw("c", fork[-1])
    got = hq.trusted()
    assert got is not None and got[0] == BY_NUMBER[100]
    # What c holds at 100 is not known from its head alone: the tracker asks it.
    assert hq.unknown_below("c") == 100
    assert hq.flags() == {}
    hq.holds("c", 100, fork[99].hash)
    assert hq.unknown_below("c") is None
    assert hq.flags() == {"c": FORK}
    # Back on the chain the others follow: trusted again.
    hq.saw("c", BY_NUMBER[101])
    assert hq.flags() == {}


def test_an_upstream_far_ahead_is_flagged() -> None:
    hq = q(ahead=10)
    hq.saw("a", BY_NUMBER[100])
    hq.saw("b", BY_NUMBER[100])
    hq.saw("c", Header(1100, "0xfar", "0xfarparent"))
    got = hq.trusted()
    assert got is not None and got[0] == BY_NUMBER[100]
    assert hq.flags() == {"c": AHEAD}


def test_two_upstreams_keep_the_higher_head_within_the_bound() -> None:
    hq = q("ab", ahead=10)
    hq.saw("a", BY_NUMBER[100])
    hq.saw("b", BY_NUMBER[105])
    got = hq.trusted()
    assert got == (BY_NUMBER[105], "b")
    hq.saw("b", Header(200, "0xfar", "0xp"))
    assert hq.trusted() == (BY_NUMBER[100], "a")
    assert hq.flags() == {"b": AHEAD}


def test_a_syncing_upstream_is_flagged_and_not_counted() -> None:
    hq = q()
    hq.saw("a", BY_NUMBER[100])
    hq.saw("b", BY_NUMBER[100])
    hq.saw("c", BY_NUMBER[101])
    hq.set_syncing("b", True)
    assert hq.flags()["b"] == SYNCING
    # Two left: the two-upstream rule, the higher head within the bound.
    assert hq.trusted() == (BY_NUMBER[101], "c")
    hq.set_syncing("b", False)
    assert "b" not in hq.flags()


def test_a_reorg_all_upstreams_follow_moves_the_head() -> None:
    hq = q()
    other = chain("r", 99, 101, MAIN[:98])
    for name in "abc":
        hq.saw(name, BY_NUMBER[100])
    for name in "ab":
        hq.saw(name, other[-1])
    got = hq.trusted()
    assert got is not None and got[0] == other[-1]
    assert hq.flags() == {"c": FORK}  # c holds the old 100; the quorum holds another


def test_upstreams_out_of_rotation_are_not_counted() -> None:
    hq = q()
    for name in "abc":
        hq.saw(name, BY_NUMBER[100])
    hq.saw("c", BY_NUMBER[110])
    hq.set_out("a", True)
    hq.set_out("b", True)
    # One left in rotation: its head, not one frozen at what the dead ones last said.
    assert hq.trusted() == (BY_NUMBER[110], "c")


def test_a_configured_quorum_of_all() -> None:
    hq = q(quorum=3)
    hq.saw("a", BY_NUMBER[100])
    hq.saw("b", BY_NUMBER[101])
    hq.saw("c", BY_NUMBER[101])
    got = hq.trusted()
    assert got is not None and got[0] == BY_NUMBER[100]  # all three hold 100, two hold 101
