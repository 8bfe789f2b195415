"""Who a call is charged to: a client's address, an IPv6 client's network."""

from __future__ import annotations

import asyncio

from chainrelay.access.identity import (
    NODE,
    Identity,
    current_identity,
    enter_identity,
    for_address,
    leave_identity,
)


def test_an_ipv4_client_is_its_address() -> None:
    assert for_address("203.0.113.7") == Identity("203.0.113.7")


def test_ipv6_clients_of_one_network_are_one_identity() -> None:
    a = for_address("2001:db8:1:2::1")
    b = for_address("2001:db8:1:2:ffff:ffff:ffff:fffe")
    assert a == b == Identity("2001:db8:1:2::/64")
    assert for_address("2001:db8:1:3::1") != a


def test_the_ipv6_prefix_is_configurable() -> None:
    assert for_address("2001:db8:1:2::1", 48) == Identity("2001:db8:1::/48")
    assert for_address("2001:db8:1:2::1", 128) == Identity("2001:db8:1:2::1")


def test_an_ipv4_mapped_address_is_the_ipv4_client() -> None:
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
    assert for_address("::ffff:203.0.113.7") == for_address("203.0.113.7")


def test_a_scoped_link_local_address_drops_its_zone() -> None:
    assert for_address("fe80::1%eth0") == Identity("fe80::/64")


def test_what_is_not_an_address_is_kept_as_it_is() -> None:
    assert for_address("") == Identity("")
    assert for_address("/run/relay.sock") == Identity("/run/relay.sock")


async def test_a_task_keeps_the_identity_it_was_made_under() -> None:
    async def who() -> Identity:
        await asyncio.sleep(0)
        return current_identity()

    token = enter_identity(Identity("198.51.100.1"))
    task = asyncio.ensure_future(who())
    leave_identity(token)
    assert current_identity() is NODE
    assert await task == Identity("198.51.100.1")
