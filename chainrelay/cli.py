"""Command line: parses arguments, loads the config, runs the app. Nothing else.

``chainrelay`` with no arguments runs the devnet demo: anvil (chain id 56, a block a
second, real transactions) with a relay in front of it on 127.0.0.1:8545.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from chainrelay import config as configmod
from chainrelay import defaults
from chainrelay.errors import ChainRelayError, ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chainrelay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run a relay node")
    serve.add_argument("--config", help="a TOML config file (see configs/)")
    serve.add_argument(
        "--upstream",
        action="append",
        default=[],
        help="an upstream JSON-RPC URL (http(s):// or ws(s)://); repeatable",
    )
    serve.add_argument("--listen", help=f"HOST:PORT (default {defaults.LISTEN})")
    serve.add_argument(
        "--admin-listen",
        help=f'the admin listener\'s HOST:PORT (default {defaults.ADMIN_LISTEN}; "" turns it off)',
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the port (SO_REUSEPORT); overrides server.workers",
    )
    val = sub.add_parser("validate", help="check a config file without starting anything")
    val.add_argument("file")
    dev = sub.add_parser("devnet", help="anvil + real transactions + a relay (the default)")
    dev.add_argument("--listen", default=defaults.LISTEN)
    dev.add_argument(
        "--admin-listen", default=defaults.ADMIN_LISTEN, help='"" turns the admin listener off'
    )
    dev.add_argument("--chain-id", type=int, default=56)
    dev.add_argument("--block-time", type=float, default=1.0)
    subs = sub.add_parser(
        "subscribe",
        help="follow a stream of blocks (or X/batches) from relay nodes; one JSON line each",
    )
    subs.add_argument("urls", nargs="+", metavar="URL", help="a node's ws://HOST:PORT/feed")
    subs.add_argument("--stream", required=True, help="e.g. bsc/blocks, arbitrum/batches")
    subs.add_argument(
        "--from", dest="from_block", type=int, help="first block (batches: first seq) wanted"
    )
    subs.add_argument(
        "--trust",
        action="append",
        default=[],
        help="an origin's (batches: a sequencer's) signer address; repeatable",
    )
    subs.add_argument("--count", type=int, help="stop after this many blocks or batches")
    subs.add_argument("--max-seconds", type=float, help="stop after this long")
    key = sub.add_parser(
        "keygen",
        help="write a new secp256k1 key (origins, sequencers, relays) and print its address",
    )
    key.add_argument("--out", help="the key file to create (mode 0600, never over one that exists)")
    demo = sub.add_parser(
        "demo",
        help="offline: anvil, an origin, two relays, two leaves, an ingress and a sequencer",
    )
    demo.add_argument("--workers", type=int, default=1, help="worker processes per node")
    demo.add_argument("--block-time", type=float, default=1.0)
    demo.add_argument("--batch-rate", type=float, default=2.0, help="batches per second")
    demo.add_argument("--dir", help="keep configs, keys and logs here (default: a temp dir)")
    pub = sub.add_parser(
        "publish",
        help="sign and push batches to ingress nodes, wait for the acks, print a JSON summary",
    )
    pub.add_argument("urls", nargs="+", metavar="URL", help="an ingress's ws://HOST:PORT")
    pub.add_argument("--stream", required=True, help="e.g. arbitrum/batches")
    pub.add_argument("--chain-id", type=int, required=True)
    pub.add_argument("--key", help="the sequencer's secp256k1 key, hex")
    pub.add_argument("--key-file", help="a file holding the sequencer's key, hex")
    pub.add_argument("--api-key", help="the ingress's API key (default: $CHAINRELAY_API_KEY)")
    pub.add_argument("--file", help="batches to push, one a line in hex")
    pub.add_argument("--count", type=int, help="generate this many batches...")
    pub.add_argument("--size", type=int, help="...of this many bytes each")
    pub.add_argument("--seed", type=int, default=0, help="of the generated batches")
    pub.add_argument("--from", dest="from_seq", type=int, default=0, help="the first seq")
    pub.add_argument("--rate", type=float, help="batches per second at most")
    pub.add_argument("--relays", type=int, default=0, help="ack once this many relays hold it")
    pub.add_argument("--window", type=int, default=defaults.PUBLISHER_WINDOW)
    pub.add_argument(
        "--confirm-every", type=int, default=0, help="send a confirmation every N batches"
    )
    return p


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Start the event loop: uvloop, chosen here and nowhere else."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


async def _until_signal(coro_factory: Any, on_hup: Callable[[], None] | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_hup is not None:  # SIGHUP: read the API keys again (Node.reload_keys)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    await coro_factory(stop)


def _serve(args: argparse.Namespace) -> int:
    from chainrelay.app import Node

    if args.config:
        cfg = configmod.load(args.config)
        if args.listen:
            cfg.server.listen = args.listen
    elif args.upstream:
        cfg = configmod.quick(args.upstream, args.listen or defaults.LISTEN)
    else:
        raise ConfigError("serve needs --config FILE or at least one --upstream URL")
    if args.workers is not None:
        cfg.server.workers = args.workers
    if args.admin_listen is not None:
        cfg.server.admin_listen = args.admin_listen
    configmod.validate(cfg)
    if cfg.server.workers > 1:
        from chainrelay.workers import supervise

        return supervise(cfg, cfg.server.workers, args.log_level)
    node = Node(cfg)
    _run(_until_signal(node.run_forever, node.reload_keys_logged))
    return 0


def devnet_config(upstream: str, listen: str, admin_listen: str) -> configmod.Config:
    """The relay of ``chainrelay devnet``: ``serve --upstream``'s, with the devnet's own
    controls let through (``defaults.DEVNET_METHODS_ENABLE``), as test suites that mine,
    snapshot and fund accounts through their RPC URL need."""
    cfg = configmod.quick([upstream], listen)
    cfg.server.admin_listen = admin_listen
    cfg.methods.enable = list(defaults.DEVNET_METHODS_ENABLE)
    return configmod.validate(cfg)


def _devnet(args: argparse.Namespace) -> int:
    from chainrelay import devnet
    from chainrelay.app import Node
    from chainrelay.collector import settle_startup_heap

    async def main(stop: asyncio.Event) -> None:
        anvil = devnet.Anvil(chain_id=args.chain_id, block_time=args.block_time)
        anvil.start()
        try:
            await anvil.wait_ready()
            node = Node(devnet_config(anvil.ws_url, args.listen, args.admin_listen))
            await node.start()
            settle_startup_heap()
            try:
                gen = asyncio.create_task(devnet.traffic(anvil.url, stop))
                url = f"http://{args.listen}"
                admin = f"http://{args.admin_listen}" if args.admin_listen else url
                print(
                    f"\nchainrelay devnet: anvil (chain id {args.chain_id}) at {anvil.url}, "
                    f"relay at {url}\n"
                    f"  web3.py : Web3(Web3.HTTPProvider('{url}'))\n"
                    f"  ethers  : new ethers.JsonRpcProvider('{url}')\n"
                    f"  wallet  : RPC URL {url}, chain id {args.chain_id}\n"
                    f"  ws      : ws://{args.listen}\n"
                    f"  metrics : {admin}/metrics   health: {admin}/health\n"
                    "The relay tree, a sequencer's batches, status pages: chainrelay demo\n"
                    "Ctrl-C stops.",
                    flush=True,
                )
                await stop.wait()
                gen.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gen
            finally:
                await node.stop()
        finally:
            anvil.stop()

    _run(_until_signal(main))
    return 0


def _subscribe(args: argparse.Namespace) -> int:
    from chainrelay.clients.batchsubscriber import print_batches
    from chainrelay.clients.subscriber import print_blocks

    code = 0

    def printer() -> Coroutine[Any, Any, int]:
        if args.stream.endswith("/batches"):
            return print_batches(
                args.urls,
                args.stream,
                from_seq=args.from_block,
                trust=args.trust,
                count=args.count,
                max_seconds=args.max_seconds,
            )
        return print_blocks(
            args.urls,
            args.stream,
            from_block=args.from_block,
            trust=args.trust,
            count=args.count,
            max_seconds=args.max_seconds,
        )

    async def main(stop: asyncio.Event) -> None:
        nonlocal code
        work = asyncio.ensure_future(printer())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            work.cancel()  # Ctrl-C: it closes its links and prints its counters
        with contextlib.suppress(asyncio.CancelledError):
            code = await work

    _run(_until_signal(main))
    return code


def _publish(args: argparse.Namespace) -> int:
    from chainrelay.clients.publisher import run_publish

    code = 0

    async def main(stop: asyncio.Event) -> None:
        nonlocal code
        work = asyncio.ensure_future(
            run_publish(
                args.urls,
                stream=args.stream,
                chain_id=args.chain_id,
                key=args.key,
                key_file=args.key_file,
                api_key=args.api_key,
                file=args.file,
                count=args.count,
                size=args.size,
                seed=args.seed,
                from_seq=args.from_seq,
                rate=args.rate,
                relays=args.relays,
                window=args.window,
                confirm_every=args.confirm_every,
            )
        )
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not work.done():
                work.cancel()  # Ctrl-C: it closes its connections
                code = 130  # interrupted: batches in flight may or may not be acknowledged
        with contextlib.suppress(asyncio.CancelledError):
            code = await work

    _run(_until_signal(main))
    return code


def _keygen(args: argparse.Namespace) -> int:
    from chainrelay.keygen import new_key, write_key

    if args.out:
        try:
            address = write_key(args.out)
        except FileExistsError:
            print(f"chainrelay keygen: {args.out} exists; not replaced", file=sys.stderr)
            return 1
        print(address)
        return 0
    key, address = new_key()
    print(f"key     {key}\naddress {address}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from chainrelay.demo import Demo

    if args.workers < 1 or args.block_time <= 0 or args.batch_rate <= 0:
        raise ConfigError("--workers, --block-time and --batch-rate must be positive")
    demo = Demo(
        workers=args.workers,
        block_time=args.block_time,
        batch_rate=args.batch_rate,
        directory=args.dir,
    )
    _run(_until_signal(demo.run))
    return demo.code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "validate":
            configmod.load(args.file)
            print(f"{args.file}: ok")
            return 0
        if args.command == "serve":
            return _serve(args)
        if args.command == "subscribe":
            return _subscribe(args)
        if args.command == "publish":
            return _publish(args)
        if args.command == "keygen":
            return _keygen(args)
        if args.command == "demo":
            return _demo(args)
        if args.command in (None, "devnet"):
            if args.command is None:
                args = _parser().parse_args(["devnet"])
            return _devnet(args)
    except ConfigError as exc:
        print(f"chainrelay: config error: {exc}", file=sys.stderr)
        return 2
    except ChainRelayError as exc:
        print(f"chainrelay: {exc}", file=sys.stderr)
        return 1
    return 0
