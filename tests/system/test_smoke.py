"""The quickest end-to-end check: a relay in front of anvil answers like anvil."""

import pytest

from chainrelay.devnet import Anvil
from tests.lab.procs import RelayFactory, rpc

pytestmark = pytest.mark.lab


async def test_relay_answers_like_anvil(anvil: Anvil, relay_factory: RelayFactory) -> None:
    relay = await relay_factory([anvil.ws_url])
    direct = await rpc(anvil.url, "eth_chainId")
    through = await rpc(relay.url, "eth_chainId", id_="x")
    assert through == {**direct, "id": "x"}
    bal = await rpc(relay.url, "eth_getBalance", [anvil_account(), "latest"])
    assert bal["result"].startswith("0x")


def anvil_account() -> str:
    return "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
