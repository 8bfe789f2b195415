"""Every default and limit, with the reason for its value. Each is overridable in config.

A config section's field names its default here (see ``chainrelay/config/``); no other
module repeats a value.
"""

from __future__ import annotations

MiB = 1024 * 1024

# --- Server --------------------------------------------------------------------------------
# The tier of clients without a key ([tiers.default]); keys name theirs.
DEFAULT_TIER = "default"
LISTEN = "127.0.0.1:8545"  # the port every Ethereum tool tries first
# Browser origins allowed to call: a public JSON-RPC endpoint is meant for any dapp.
CORS_ORIGINS = ("*",)
# Worker processes sharing the port: one; each more serves from another core (workers.py).
WORKERS = 1
# Connects the feeder worker's private feed listener holds before it takes them (the other
# workers' links to it, see tree/siblings.py): each worker has one under way at a time, two
# for a moment when one timed out while the feeder restarted; a hundred workers fit.
WORKER_FEED_BACKLOG = 256
# An IPv6 client is counted by its network of this many bits, as Nitro's feed does: a
# subscriber is usually handed a /64, and per-address limits per /128 would let it take a
# fresh address for every connection.
IPV6_CLIENT_PREFIX = 64
# --- who a client is: proxies in front of the node, API keys (chainrelay/access/) -------
# Addresses whose X-Forwarded-For / Forwarded / PROXY header is believed: none. A header a
# client wrote itself is otherwise taken at its word, and any client could be anyone.
TRUSTED_PROXIES: tuple[str, ...] = ()
# The header a trusted proxy names the client in: the one it writes. nginx and most
# balancers append to X-Forwarded-For and pass a client's own Forwarded line through
# untouched, so reading both would let a client pick its address.
CLIENT_ADDRESS_HEADER = "x-forwarded-for"
# PROXY protocol (v1/v2, as HAProxy and AWS NLB send it) on the listener: off.
PROXY_PROTOCOL = False
# Hops of X-Forwarded-For / Forwarded walked from the right: a chain of proxies is two or
# three deep; a 32 KiB head holds ~2,000 hops, each an address to parse per request.
MAX_FORWARDED_HOPS = 16
# A PROXY header's bytes: a v1 line is at most 107; HAProxy's v2 TLVs (ALPN, authority, TLS
# details) and NLB's (its endpoint id) take a few hundred. Past this: malformed, closed.
MAX_PROXY_HEADER_BYTES = 1024
# Calls without a key: answered, as the default tier's (true: refused, 401).
AUTH_REQUIRED = False
# API keys shorter than this are refused in config (a key in a URL must not be guessable).
MIN_CLIENT_KEY_CHARS = 16
# geth's HTTP server refuses bodies over 5 MiB; a relay must accept whatever geth accepts.
MAX_BODY_BYTES = 5 * MiB
# geth's BatchRequestLimit is 1000; longer batches are abuse more often than need.
MAX_BATCH_LEN = 1000
# Request line plus headers: nginx's large_client_header_buffers total 32 KiB.
MAX_HEADER_BYTES = 32 * 1024
# Answers queued on one connection before we stop reading from it (backpressure, not loss).
MAX_PENDING_PER_CONNECTION = 256
# Answers made elsewhere (range answers, batch pushes over POST) one HTTP connection may
# have under way; more are answered 429: a range answer runs to megabytes (a pusher that
# wants more in flight uses the WebSocket).
MAX_PENDING_REPLIES = 4
# Connections one IP may hold: a browser opens ~6, a busy backend a few hundred. Counted at
# accept, before any key is known, so per client address, never per key: the peer's, the
# one a trusted proxy's PROXY header names, or, for a WebSocket through a trusted HTTP
# proxy, the one its upgrade's forwarding header names (a proxy's keep-alive connections
# carry many clients and count as none's).
MAX_CONNECTIONS_PER_IP = 1024
# Idle keep-alive connections are closed after this; matches nginx's keepalive_timeout.
KEEPALIVE_TIMEOUT = 75.0
# A WebSocket message is a JSON-RPC body, so it gets the same ceiling.
MAX_WS_MESSAGE_BYTES = MAX_BODY_BYTES
# Bytes buffered for a slow WebSocket reader before the connection is closed (1013).
MAX_WS_SEND_BUFFER = 16 * MiB
# A WebSocket peer told to close (a slow reader, a lagging child, a bad hello) that has not
# closed within this long is dropped, with whatever is buffered for it: websockets' own
# close_timeout; a peer that ignores a close for 10 s will not read it.
WS_CLOSE_TIMEOUT = 10.0
# Bytes one client address may make the front door hold at once (server/budget.py): bodies
# and WebSocket messages still coming in, answers and control frames queued for it. Six of
# the largest bodies at once: a backend uploading a few large calls in parallel fits, and
# 1,024 connections of one address no longer hold 5 GiB. Past it: 429, close 1008. Per
# client address, never per key: bytes are held as they arrive, before a key is read (a
# trusted proxy's connection has a share of its own).
MAX_BUFFERED_BYTES_PER_IP = 32 * MiB
# The same over every client: four addresses at their share. Half what the cache may take,
# so a flood from many addresses (all of 127/8 is loopback) costs refusals (503, close
# 1013), not the node; requests read whole in one read never count against it. Each worker
# process holds its own budget (a node of N workers: N times this at most).
MAX_BUFFERED_BYTES_TOTAL = 128 * MiB
# A request (head and body) or WebSocket message begun must be whole within this, or the
# connection is dropped (408, close 1008): nginx's client_body_timeout is 60 s between
# reads; half of it for a whole message, since a JSON-RPC call is kilobytes and even the
# largest body (5 MiB) needs only 175 KB/s. A trickling client no longer pins its bytes
# until the keep-alive sweep.
BODY_READ_TIMEOUT = 30.0
# After a connection's last answer (a refusal, Connection: close) what the client still
# sends is read and dropped for up to this long and ...
LINGER_TIMEOUT = 5.0  # nginx's lingering_timeout
# ... this many bytes, so that it reads its answer (a 413) rather than a reset: the rest of
# a body refused for its size, which is rarely much over the limit.
LINGER_BYTES = 2 * MAX_BODY_BYTES
# Requests parsed from one connection per loop turn: a pipelined flood (10,000 requests in
# one write) is served a slice at a time, other connections in between; 64 small calls
# take well under a millisecond, and a client that pipelines legitimately (a few dozen
# calls) is served in one turn.
MAX_REQUESTS_PER_TURN = 64
# Relays a request may have passed through (its Via header) before a node refuses it with
# 508: a tree is a few levels deep (origin, regional relays, leaves), so a longer chain is
# a loop that named none of its nodes twice.
MAX_RELAY_HOPS = 8
# Bytes held by each table of repeated cache hits (the pipeline's by body, the front door's
# by whole request, ids aside): thousands of distinct hot calls of one block fit; past it a
# table starts over, so a flood of distinct calls costs hits, not memory.
MAX_HIT_TABLE_BYTES = 16 * MiB
# Entries in each of those tables and in the plan memo: bounds the dict overhead a flood of
# tiny distinct calls can pin within one block, whatever their bytes.
MAX_HIT_TABLE_ENTRIES = 50_000
# Request heads the front door remembers the client of (a key, a forwarded address), so a
# keyed client's next request with the same head is not searched for its key again (~3 µs
# of a ~12 µs hit); and, in a table of its own, heads it remembers what they say of the
# body and the answer (its length, CORS, gzip, an id: ~2 µs of regexes a request). A
# client's heads differ only in Content-Length, a few per client; past it a table starts
# over. At most this many heads of MAX_HEADER_BYTES each: 32 MiB a table, in truth a few
# hundred bytes each.
MAX_NAMED_HEADS = 1024
# Params (as JSON) past this size are planned on every call, never memoised: planning is
# cheap next to decoding such a body, and a body may carry megabytes of params. A large
# eth_call's calldata fits.
MEMO_MAX_PARAMS_BYTES = 4096
# Upstream calls under way for clients, node-wide; past it a miss is answered -32005 at once
# (retry later) instead of queueing: 64 keep-alive connections per upstream x a few calls
# each, ~16 upstream batches of 100 with room for single misses; far above what a node
# answers at once without every client's latency rising together. Per worker process.
MAX_UPSTREAM_IN_FLIGHT = 1024
# The same per client address: a quarter of the node's, so one client cannot take it all;
# a batch of 1000 misses goes a few upstream batches at a time within it, its later chunks
# waiting for its earlier ones (within the call's deadline, else -32005).
MAX_UPSTREAM_IN_FLIGHT_PER_CLIENT = 256

# --- Operator surfaces (server/admin.py, server/accesslog.py, server/compress.py) ---------
# The admin listener (/metrics, the full /health, the admin JSON-RPC): loopback, so only the
# host's operator (and its Prometheus) reach it. 9645 is clear of what runs beside a relay:
# JSON-RPC 8545/8546, the engine API 8551, geth's and BSC's metrics 6060, Nitro's 6070 and
# its feed 9642, Redis 6379, Prometheus 9090. A second node on the host sets its own (it
# refuses to start on a port taken); ":PORT" binds loopback, "" turns the listener off.
ADMIN_LISTEN = "127.0.0.1:9645"
# The public port serves /metrics and the full /health (upstream names and latencies, tree
# detail) only while the admin listener is off, or when this says so: a public URL tells
# anyone its liveness, not its upstreams and its traffic.
PUBLIC_METRICS = False
# How long the admin listener's /metrics waits for each other worker's registry (under
# ``--workers``): a scrape is a local Unix-socket round trip of ~1 ms; a worker stuck longer
# is left out of that scrape (chainrelay_worker_scrape_failures counts it), never waited on.
ADMIN_SCRAPE_TIMEOUT = 1.0
# The access log: off ("-": stderr; else a file path, appended to).
ACCESS_LOG = ""
# Share of successful requests logged (errors always are): 1.0 logs every one.
ACCESS_LOG_SAMPLE = 1.0
# Lines are written by a thread, in chunks: one every interval, or sooner once this many
# bytes wait (64 KiB: one write() of a few hundred lines, a pipe's whole buffer).
ACCESS_LOG_FLUSH_INTERVAL = 0.5
ACCESS_LOG_FLUSH_BYTES = 64 * 1024
# Bytes of lines held while the disk is slower than the node: past it lines are dropped and
# counted (chainrelay_access_log_dropped), never waited for. 8 MiB: ~30,000 lines, seconds
# of a busy node's traffic.
ACCESS_LOG_MAX_BUFFER_BYTES = 8 * MiB
# An incoming X-Request-Id longer than this (or not of URL-safe characters) is replaced:
# a UUID is 36, a W3C trace id 32; 128 leaves room for prefixed ids, not for a payload.
REQUEST_ID_MAX_BYTES = 128
# Answers at least this large are gzipped for clients that ask: below ~1 KiB gzip's 18
# bytes of framing and a few hundred ns of CPU buy little (an answer is one TCP segment
# either way), while block and log answers (tens of KB of hex) shrink ~2-3x.
GZIP_MIN_BYTES = 1024
# zlib level 1: ~2.5x on JSON-RPC hex at ~100 MB/s a core; level 6 gains ~10% more at a
# third of the speed, which a node serving from cache cannot spend.
GZIP_LEVEL = 1
# permessage-deflate on client WebSockets: off (each connection then holds a zlib state of
# ~300 KB, and the fan-out's prebuilt frames must be compressed per connection).
WS_DEFLATE = False
# --- Which calls are served ([methods], [logs]; access/methods.py, rpc/logguards.py) -------
# Methods served beyond the defaults (the policy table's, net_/web3_, a few standard reads),
# and methods refused among them: none; a node on a public URL serves no debug_, trace_,
# txpool_, admin_, personal_, miner_, engine_ or devnet control unless its operator says so.
METHODS_ENABLE: tuple[str, ...] = ()
METHODS_DISABLE: tuple[str, ...] = ()
# What ``chainrelay devnet`` serves beyond them: its anvil's controls. Test suites written
# for hardhat or foundry mine, snapshot, revert and fund accounts through their RPC URL
# (evm_mine, anvil_setBalance; anvil answers hardhat's names too), and a local devnet has
# no public to keep them from.
DEVNET_METHODS_ENABLE = ("anvil_*", "evm_*", "hardhat_*")
# eth_getLogs' widest block range: 0 takes the chain profile's (chain/profiles.py: 10,000
# blocks on BSC, 100,000 on Arbitrum).
LOGS_MAX_BLOCK_RANGE = 0
# Addresses, and topics per position, of one eth_getLogs: geth's own bounds for a filter
# (the [filters] ones), so a query and the filter made of it are held to the same.
LOGS_MAX_ADDRESSES = 1000
LOGS_MAX_TOPICS_PER_POSITION = 1000
# An eth_getLogs answer's bytes: 10,000 logs (Infura's cap on results) of ~700 B of JSON
# each, with room; under the WebSocket send buffer (16 MiB), so a subscriber's connection
# can take it, and over it an answer is held by the node, upstream and cache alike.
LOGS_MAX_ANSWER_BYTES = 10 * MiB
# A range wider than this many blocks is asked upstream in chunks of it (rpc/logsplit.py):
# 0 takes the chain profile's (chain/profiles.py: 5,000 blocks on BSC, 10,000 on Arbitrum,
# the ranges their public providers accept).
LOGS_SPLIT_BLOCKS = 0
# Chunk calls one split eth_getLogs has under way at once: a scan of 50 chunks takes ~13
# round trips, not 50, and holds no more upstream calls than four clients would. Each chunk
# under way holds one of the client's slots ([limits] max_upstream_in_flight_per_client):
# beyond the first (its call's own slot), only slots it has free, so an identity's chunks
# and other calls together stay within its bound.
LOGS_SPLIT_CONCURRENCY = 4
# --- Rate limits per identity (chainrelay/access/buckets.py, limiter.py) ------------------
# Calls per second one identity of a tier may make, on average: 0, no limit. Off by
# default: a relay in front of a private node has no one to shed; a public one sets its
# tiers' rates ([tiers.default] rate = 50 is a generous dapp: a page load is ~20 calls).
RATE = 0.0
# Calls one identity may make at once above its rate (the bucket's depth): a dapp's page
# load of ~20-40 reads, or one batch of that many, passes untouched.
RATE_BURST = 100.0
# What a cache hit costs against the bucket, as a share of its method's cost: 1, a hit
# costs what a miss does (the node's CPU is spent either way); lower it to favour clients
# whose calls the cache answers.
HIT_COST_FACTOR = 1.0
# The cost of a call of a method not named in RATE_METHOD_COSTS.
RATE_DEFAULT_COST = 1.0
# Methods that cost an upstream node more than a plain read: eth_getLogs scans a range of
# blocks (Alchemy prices it at 75 compute units against eth_chainId's 0-10), eth_call and
# eth_estimateGas run the EVM, a trace replays a block. Overridable per method
# ([limits] method_costs).
RATE_METHOD_COSTS = {
    "eth_getLogs": 10.0,
    "eth_call": 4.0,
    "eth_estimateGas": 4.0,
    "eth_getFilterLogs": 10.0,
    "debug_traceTransaction": 20.0,
    "debug_traceCall": 20.0,
    "trace_block": 20.0,
    "trace_transaction": 20.0,
    "eth_sendRawTransaction": 2.0,
    "eth_chainId": 0.5,
    "eth_blockNumber": 0.5,
}
# Identities whose buckets one process keeps: ~150 bytes each, so 15 MB at the cap. Idle
# buckets that have refilled are dropped first (one recreated full is the same bucket);
# past the cap with every bucket active, new identities share one bucket (an address scan
# shares one budget, and cannot grow the table).
MAX_RATE_BUCKETS = 100_000
# Under a shared Redis tier a process leases its identities' allowance from Redis in
# slices of this share of the rate (20 ms of it, at most a 20th of the burst): most calls
# take from the slice without a round trip, and what N processes hold unused at once is
# N slices, a few percent of the budget.
RATE_LEASE_SECONDS = 0.02
RATE_LEASE_BURST_SHARE = 0.05
# eth_sendRawTransaction per sender (recovered from the signed transaction), as proxyd's
# sender limit: transactions per second and at once of one sender address, whatever
# identity sends them (0: no limit; off by default).
SENDER_RATE = 0.0
SENDER_BURST = 10.0

# --- Cache ---------------------------------------------------------------------------------
# "memory": this process only; a node with one worker needs nothing else. "tiered" puts the
# memory LRU in front of a shared Redis, "redis" keeps only a minimal memory tier.
CACHE_BACKEND = "memory"
# Holds ~100k typical answers or a few thousand full blocks; a relay's working set.
CACHE_MEMORY_BYTES = 256 * MiB
# One answer larger than this is served but never stored: it would evict too much.
CACHE_MAX_ENTRY_BYTES = 8 * MiB
# Block logs held to answer eth_getLogs locally (chain/logstore.py), oldest blocks dropped
# first. A log held costs ~1.3 KB (its JSON, ~720 B on the mainnet corpus block, plus its
# address and topics kept apart for matching); a BSC block of ~500 logs is ~650 KB, so this
# holds ~200 such blocks (2.5 min at 0.75 s): past the ~100 blocks that dapps' sliding
# eth_getLogs windows reach back, well within what the cache itself may take.
CACHE_LOGS_BYTES = 128 * MiB
# Sub-ranges of one eth_getLogs window asked upstream around the held blocks: one is the
# usual case (a window reaching past the oldest block held), a second a block the follower
# gave up on in the middle. With more, the calls cost the upstream more than the window
# asked whole, which is what happens then.
CACHE_LOGS_MAX_UPSTREAM_RANGES = 2

# --- Redis tier (the [cache] redis_* keys; see chainrelay/rpc/shared_cache.py) -------------
# Redis' own port on the local host: the compose file and docs/deployment.md override it.
REDIS_URL = "redis://127.0.0.1:6379/0"
# One Redis may serve other applications too; every key says whose it is.
REDIS_KEY_PREFIX = "chainrelay:"
# Redis runs commands on one thread: a multi-MB value stalls every other client while it is
# copied. 2 MiB holds a full BSC block with its transactions; bigger answers stay local.
REDIS_MAX_ENTRY_BYTES = 2 * MiB
# Finalized answers never change: kept a week, and in practice until allkeys-lru evicts
# them. The TTL only guards a Redis that was started without maxmemory.
REDIS_TTL_FINALIZED = 7 * 24 * 3600.0
# Unfinalized answers are keyed by block hash; once the block is final, calls key it by
# number instead. 30 min outlives Arbitrum's L1-based finality lag (~15-20 min).
REDIS_TTL_UNFINALIZED = 1800.0
# Covers a normal upstream call (public RPCs answer in well under 2 s at p99); waiters of a
# holder that died fall back to their own call after at most this.
REDIS_LOCK_TTL = 3.0
# A Redis in the same region answers in well under a millisecond; at 250 ms it is overloaded
# or gone and the upstream path is as fast, so the tier is marked down.
REDIS_TIMEOUT = 0.25
# Connecting includes the TCP handshake and HELLO; twice the command timeout.
REDIS_CONNECT_TIMEOUT = 0.5
# A down Redis is probed this often: back within a second of recovering, one PING a second.
REDIS_RETRY_INTERVAL = 1.0
# Concurrent Redis commands per process; a caller beyond waits for a connection (within the
# command timeout). Each is a socket on the Redis side, so N workers x this must fit maxclients.
REDIS_MAX_CONNECTIONS = 64
# The in-process tier of backend = "redis": RpcService answers hits synchronously only from
# memory and rechecks it after coalescing, so a tier stays; 1 MiB keeps the hottest answers
# (chain id, the head's gas price, a hot eth_call) without holding a copy of Redis per worker.
REDIS_MODE_MEMORY_BYTES = 1 * MiB

# --- Upstreams -----------------------------------------------------------------------------
# One deadline per client call, covering all its tries, hedges and the forwarding path:
# past it the call ends with -32002. Under web3.py's 30 s request timeout and ethers' 120 s
# (and the 10-15 s a browser dapp waits before showing an error), so a client always reads
# the node's answer instead of timing out itself while the node still retries.
CALL_DEADLINE = 10.0
# One try of a call that has not answered in this long is retried (on another upstream
# where there are several). Half the deadline, so a second try fits in it: public RPCs
# answer in well under 2 s at p99, and a node that has not answered in 5 s is more often
# hung than busy. Each try is also cut to what is left of the deadline.
UPSTREAM_TIMEOUT = 5.0
# Attempts per read, across distinct upstreams where there are several.
UPSTREAM_MAX_ATTEMPTS = 3
# Hedge slow reads (a second call on another upstream): tail latency falls for ~5 % more calls.
HEDGE = True
# Hedge a read when it is slower than this quantile of the upstream's recent latencies.
HEDGE_QUANTILE = 0.95
# Never hedge sooner than this: below it a second call costs more than it saves.
HEDGE_MIN_DELAY = 0.05
# An upstream this many blocks behind the best is taken out of rotation.
MAX_LAG_BLOCKS = 5
# Errors in a row that take an upstream out of rotation. A provider's 429 ("slow down") is
# never one of them; while no upstream is in rotation a call fails at once (-32001).
MAX_CONSECUTIVE_ERRORS = 3
# How often an out-of-rotation upstream is probed to bring it back; each probe is bounded
# by this interval too, so probes start on a fixed cadence and a healed upstream is back
# within one interval (a restart's connection resets cost at most that much refusal).
PROBE_INTERVAL = 2.0
# Longest "Retry-After" a provider's 429 is honoured for: the upstream is tried last until
# then. A minute bounds what one odd header can make the node avoid an upstream.
RETRY_AFTER_MAX = 60.0
# Keep-alive connections per upstream; more than anvil or a provider serves well at once.
UPSTREAM_CONNECTIONS = 64
# A WebSocket upstream is pinged this often; one that sends nothing for a whole period
# after a ping is dead and is reconnected (websockets' own default; geth expects pings).
WS_PING_INTERVAL = 20.0
# Connections a WebSocket upstream spreads its single calls over, the first included (more
# are opened only while calls overlap: a quiet node keeps one). A node may serve one
# connection's calls with less parallelism than separate ones (anvil drives each connection
# from one task), and a connection carries its answers in order: behind a block's 2 MB of
# receipts, every call waits. Under dapp_burst's load (50 users in bursts, a busy chain),
# eth_call's p99 through a warm relay was 125 ms over one connection, 97 ms over 4, 60 ms
# over 16, 43 ms over HTTP's pool of 64 (runs of one hour, medians of their rounds).
WS_LANES = 16
# After a further connection failed to open, none is tried again for this long.
WS_LANE_RETRY = 5.0
# Largest message taken from a WebSocket upstream: a full BSC block with its transactions
# stays far below, while debug_trace answers can reach tens of MiB.
WS_MAX_MESSAGE_BYTES = 64 * MiB
# HTTP upstreams (chainrelay/upstreams/httplink.py). An idle keep-alive connection is closed
# after this: aiohttp's default, which the node used until now; under most gateways' own
# (nginx 75 s, AWS ALB 60 s), so the upstream rarely closes one just as a request goes out.
HTTP_UPSTREAM_KEEPALIVE = 15.0
# Requests in flight at once on one connection (HTTP/1.1 pipelining) once every connection
# of the upstream is busy: each waits for the answers before it, so a few, not many. 1: off.
HTTP_UPSTREAM_PIPELINE_DEPTH = 4
# Largest answer taken from an HTTP upstream, as read and once decoded (gzip): as for a
# WebSocket upstream's message (a BSC block with its transactions stays far below,
# debug_trace answers reach tens of MiB); past it the try fails and the connection goes.
HTTP_UPSTREAM_MAX_ANSWER_BYTES = 64 * MiB
# Ask HTTP upstreams for gzip/deflate answers (Accept-Encoding), as aiohttp did. Measured
# here: mainnet block 18,000,000's receipts (474 KB) gzip 13.5x and decode in 0.42 ms, its
# full block (654 KB) 2.5x in 1.9 ms; 394-438 KB less on the wire is 3 ms at 1 Gbit/s, 30 ms
# at 100 Mbit/s, so a remote provider's answers come sooner compressed. A 1 KB answer costs
# 4-6 us to decode (anvil and geth never compress). Off for an upstream on the same LAN.
HTTP_UPSTREAM_ACCEPT_ENCODING = True
# Calls per JSON-RPC batch sent upstream (a client batch's misses go up in chunks this long):
# many providers cap batches at 100 or less (geth's own cap is 1000); 100 calls in one
# request instead of 100 requests.
UPSTREAM_BATCH_LEN = 100
# Smoothing of the latency EWMA: ~the last 10 calls dominate.
LATENCY_EWMA_ALPHA = 0.1

# --- Upstream routing: roles, budgets, capabilities (upstreams/budget.py, capabilities.py) --
# An [[upstreams]] entry's role: "primary" shares reads by weight; "fallback" serves only
# what no primary can (down, lagging, over budget, lacking the method or the block), so a
# paid provider kept as fallback is billed for exactly that.
UPSTREAM_ROLE = "primary"
# Share of a primary among the primaries (smooth weighted round robin, nginx's): 1 each is
# an even split.
UPSTREAM_WEIGHT = 1
# Calls per second sent to one upstream (0: no bound): a provider's plan quota, kept below
# so its 429s are the exception. Every call counts, the head tracker's and probes' too.
UPSTREAM_MAX_RPS = 0.0
# Calls in flight to one upstream at once (0: no bound); some providers cap concurrency.
UPSTREAM_MAX_CONCURRENCY = 0
# Whether a read the node pins to a block by hash is sent by number to an upstream whose own
# last reported head is that block. Off: behind one provider URL may stand several nodes, at
# the tip on different forks, and a number would be answered from whichever one took the
# request (stored under the hash the read names). On for an upstream that is one node, where
# a number at its head is the same state and can be faster (anvil: a hash costs it p50 4.8
# against 2.9 ms, p99 38 against 9 ms, under busy traffic).
UPSTREAM_HEAD_BY_NUMBER = False
# Burst a rate budget allows, in seconds of its rate (at least one call): a provider's
# one-second window then sees at most 1.2x the rate, never a whole second's worth twice.
BUDGET_BURST_SECONDS = 0.2
# Longest a read waits for an upstream's budget when every upstream that could serve it
# is at its bound: a burst over the quota is smoothed, a flood is refused (-32005).
BUDGET_WAIT = 0.5
# How long "this method is not supported here" is believed: a provider's plan or a
# node's flags change rarely, and one probe of the method per 10 minutes costs nothing.
CAPABILITY_TTL = 600.0
# Pause after a JSON-RPC "slow down" answer (a provider's rate-limit wording under HTTP
# 200), which carries no Retry-After: one second, a provider's usual window.
SLOW_DOWN_PAUSE = 1.0
# Auto-tuning of max_rps from 429s (erpc's rateLimitAutoTune): off unless asked.
AUTO_TUNE = False
# Auto-tuning: each 429 period cuts the rate by this factor; each quiet period raises it by
# the other, up to max_rps: quick to back off, slow to come back (erpc: 0.9/1.05 per period).
AUTO_TUNE_DECREASE = 0.9
AUTO_TUNE_INCREASE = 1.05
# Auto-tuning's period: one cut per period however many 429s one burst brought back.
AUTO_TUNE_PERIOD = 1.0
# Auto-tuning never cuts a rate below this, in calls per second: a budget of 0 would
# stop the upstream for good.
AUTO_TUNE_FLOOR = 1.0
# Probes of a pruned upstream's lowest block (bisection): 32 steps reach any block number.
AVAILABILITY_PROBE_STEPS = 32

# --- Head tracker --------------------------------------------------------------------------
# Canonical hashes remembered per chain: deeper than any reorg either chain has seen.
REORG_WINDOW = 256
# Recent canonical hashes fetched behind the first head, so reads of blocks from just
# before a start are cached by hash at once: a BSC minute, well inside the window.
BACKFILL_BLOCKS = 64
# With 3 upstreams or more, the head is a block this many of them hold by hash (0: a
# majority): one upstream on a fork of its own never moves the head clients see.
HEAD_QUORUM = 0
# An upstream whose head is more than this many blocks above the trusted head is flagged
# and not used for `latest`: 64 blocks is 48 s on BSC, 16 s on Arbitrum, far past the few
# blocks (MAX_LAG_BLOCKS) by which well upstreams differ; a head further ahead is a chain
# (or a misconfigured devnet) nobody else follows.
HEAD_MAX_AHEAD_BLOCKS = 64
# How often each upstream is asked eth_syncing (and once at start): a node catching up
# reports heads behind the chain's, so is flagged "syncing" until it says it is done;
# once a minute costs nothing next to head polling.
HEAD_SYNCING_EVERY = 60.0
# A fallback's head is checked this often while the primaries serve (and at full cadence
# only while it serves): a paid fallback is billed per call, and a check every 30 s (2 calls
# a minute, against ~80 when polled every 0.75 s BSC block) is enough to know it is alive
# and not lagging when it is needed. A fallback does not vote on the head meanwhile.
HEAD_FALLBACK_INTERVAL = 30.0
# How often safe/finalized are refreshed, in blocks.
FINALITY_REFRESH_BLOCKS = 4
# eth_blockNumber is answered locally only while the head is this fresh, in block times;
# past it it goes upstream (eth_chainId is always local: the chain id checked at start).
HEAD_FRESH_BLOCKS = 3.0
# HTTP head polling (chainrelay/chain/headpoll.py). Fractions are of the learned block
# interval. A probe's first poll goes this early: the block's expected time is known to
# within about one near-poll step, so one poll before it usually suffices.
HEAD_POLL_LEAD = 0.05
# Blocks per such early look; the others are first polled just after they are due, which
# costs one poll for a block on time but cannot see the chain drift earlier: 1 in 4 keeps
# the phase within a few percent of a block while costing about 1.3 polls a block.
HEAD_POLL_PROBE_EVERY = 4
# Then a poll this often until the block arrives: a block waits half of it on average,
# 5 % of a block time against 12.5 % when every block time / 4 was polled.
HEAD_POLL_NEAR = 0.1
# Weight of each observed interval in the learned one: ~the last 5 blocks dominate, so a
# wrong profile block time (anvil's 1 s against BSC's 0.75 s) is learned in a few seconds.
HEAD_INTERVAL_ALPHA = 0.25
# The learned interval stays within these multiples of the profile's block time: a stall
# or a burst of blocks cannot teach the schedule a time the chain does not keep.
HEAD_INTERVAL_MIN_FACTOR = 0.5
HEAD_INTERVAL_MAX_FACTOR = 3.0
# Growth of the wait per poll once a block is overdue by half an interval: a stalled chain
# is asked less and less, up to HEAD_POLL_MAX_INTERVAL.
HEAD_POLL_BACKOFF = 1.5
# Shortest wait between polls: 20 polls a second is enough for 0.25 s Arbitrum blocks.
HEAD_POLL_MIN_INTERVAL = 0.05
# Longest wait between polls, so a long block time still notices a stalled upstream and a
# quiet chain's head stays fresh (HEAD_FRESH_BLOCKS).
HEAD_POLL_MAX_INTERVAL = 2.0

# --- Filters (eth_newFilter & co) ------------------------------------------------------------
# geth drops a filter not polled for 5 minutes; clients written against geth poll sooner.
FILTER_IDLE_TIMEOUT = 300.0
# Filters held by one node: each is matched against every block's logs, so this bounds the
# per-block CPU of matching (one catch-all filter per dapp backend of a busy relay).
MAX_FILTERS = 10_000
# Changes one filter buffers between polls, then the filter stops collecting (its client's
# next poll gets -32005 saying so, the one after "filter not found", and it reinstalls): a
# catch-all log filter on BSC (~2k logs a block every 3 s) polled each minute holds ~40k.
# Polls are answered in pages of [logs] max_answer_bytes, so a full buffer (~35 MB of
# logs) drains in a few polls; its memory is mostly the log objects, shared by filters.
MAX_FILTER_CHANGES = 50_000
# Changes every filter of the node buffers together: twenty catch-all log filters at their
# full MAX_FILTER_CHANGES. Each is a reference (8 B) to a log or a hash, but the logs it
# keeps alive are ~1.3 KB each: without it, MAX_FILTERS rarely polled filters could hold
# 500 million references and the chain's logs of a whole idle timeout. At the bound the
# largest buffers (the filters polled least) stop first, until a tenth of it is free.
MAX_FILTER_CHANGES_TOTAL = 1_000_000
# Filters one client may hold, per identity despite the name (its API key, else its real
# address): a busy dapp backend polls a few hundred, and one client can never take more
# than a tenth of MAX_FILTERS and lock every other client out.
MAX_FILTERS_PER_IP = 1000
# geth's maxAddresses (1.14): bounds the memory one filter object can pin, and a filter's
# entries in the address index.
MAX_FILTER_ADDRESSES = 1000
# geth's maxSubTopics (1.14): bounds the memory one filter object can pin and the work of
# matching one log position against it.
MAX_TOPICS_PER_POSITION = 1000

# --- Subscriptions (eth_subscribe over WebSocket) ------------------------------------------
# Subscriptions one connection may hold: a dapp watching a few hundred contracts with one
# logs subscription each fits; more is one client pinning the node's fan-out work.
MAX_SUBSCRIPTIONS_PER_CONNECTION = 1000
# Subscriptions one client may hold across its connections (at most MAX_CONNECTIONS_PER_IP
# of them), per identity despite the name (its API key, else its real address): a busy
# indexer backend, not a flood.
MAX_SUBSCRIPTIONS_PER_IP = 10_000
# Subscriptions of the whole node: bounds their memory and the frames written per block
# (one per newHeads subscriber, one per matching log and logs subscriber); matching work is
# bounded by MAX_LOG_FILTERS, since subscribers sharing a filter share its matches.
MAX_SUBSCRIPTIONS_TOTAL = 100_000
# Distinct logs filters of the node (subscribers with one filter count once). Filters are
# indexed by address, else topic0, so a log is matched only against those that name its
# address or topic0 and the few with neither; the worst case, every filter on one hot
# topic0 (or none), costs ~1.3 us per filter per log: 1,000 x 500 logs ~ 0.65 s a block.
MAX_LOG_FILTERS = 1000
# Distinct logs filters one client may hold (per identity, as above): a quarter of the
# node's, so one client can never lock every other client out of new filters.
MAX_LOG_FILTERS_PER_IP = 250
# Notifications held on one connection for subscriptions whose id has not reached the
# client yet (its eth_subscribe answer is still being written): a few blocks' worth for
# the subscriptions a connection opens at once; past it the connection is closed.
MAX_HELD_NOTIFICATIONS = 4096
# Bytes of such held notifications per connection: a few full BSC newHeads/log bursts.
MAX_HELD_BYTES = 8 * MiB
# Pending transactions fetched at once (eth_getTransactionByHash, one per hash for every
# fullTx subscriber): BSC's mempool sees hundreds a second; past this a hash is skipped
# and counted, so a flood costs no unbounded tasks or upstream calls.
PENDING_TX_FETCHES = 64
# A subscriber closed for reading too slowly gets this long to take its close frame before
# its connection is dropped, so a reader that never reads cannot pin its send buffer.
SLOW_CLOSE_GRACE = 5.0
# Fetch every block (and warm the cache with it) even while nobody subscribes: for a node
# whose clients read each new block anyway. Off: two upstream calls per block saved.
# True overrides FOLLOW_BLOCKS with "always".
FOLLOW_BLOCKS_ALWAYS = False
# When the block follower fetches each new block: "auto" while someone subscribes or clients
# read block, transaction, receipt or log data lately, hit or miss (two calls a block then
# replace a receipt miss per transaction read and the latest block's miss), "always", or
# "never" (only while someone subscribes).
FOLLOW_BLOCKS = "auto"
# Blocks an automatic feed keeps following after a client's last such read: a dapp that
# polls every few seconds reads at least once in this many BSC blocks (a minute), and a
# node whose clients went away wastes at most twice this many calls.
FOLLOW_RECENT_BLOCKS = 20
# Blocks filled at once after clients' misses (a receipt miss brings in its block's
# receipts, a transaction miss its block's transactions; see chainrelay/chain/fill.py): a
# burst of readers over the last hundred blocks fills a handful at a time, and a client
# scanning receipts of old blocks cannot make the node call upstream twice per read.
MAX_BLOCK_FILLS = 8
# Blocks remembered as filled, so a block is filled once: two kinds of fill over the reorg
# window and then some, at about 150 bytes each.
FILLED_BLOCKS_REMEMBERED = 4096
# Blocks just behind the block follower's first block whose receipts (and so their logs) are
# filled, newest first, once clients' reads miss there (chain/windowfill.py): the head
# tracker's backfill window, the blocks before a start the node can vouch for by hash (final
# blocks below it, when the head holds fewer hashes, by number). A dapp reading receipts and
# logs of the last minute then pays one call per block there instead of a receipt miss and a
# fill, and its eth_getLogs windows are answered locally (benchmarks/dapp_burst.py, a cold
# relay's 20 s phase over the last 100 blocks: receipt misses 145 -> ~65, eth_getLogs
# upstream 53 -> ~9, 0.476 -> 0.446 upstream calls per client call). Deeper costs more than
# it saves there: 128 blocks gave 0.454, the blocks past the 100 read never paying back.
# Once per run of the follower; 0: off.
FILL_WINDOW_BLOCKS = BACKFILL_BLOCKS
# Of those fills, at most this many at once, and never past MAX_BLOCK_FILLS with the fills
# of clients' misses: half the filler's slots, so clients' misses keep the other half.
FILL_WINDOW_AT_ONCE = 4
# Reads missing in that window before it is filled: a dapp's burst reads a dozen receipts
# of as many blocks at once and crosses it in its first burst, while one wallet looking up
# one receipt does not make the node ask for a whole window (those reads pay their own
# misses and fills: 2 calls each, 8 of them a quarter of the window's 64).
FILL_WINDOW_AFTER_MISSES = 8

# --- Block feed (what eth_subscribe and eth_newFilter follow) ------------------------------
# Wait before asking again for a block an upstream could not give (not there yet, or an
# error): about a sixth of a BSC block time, so a lagging upstream costs little delay.
FEED_FETCH_RETRY_DELAY = 0.5
# Tries for one block in one pass before the feed waits for the next head change (or the
# retry delay) to try again: three seconds of tries, one BSC block time.
FEED_FETCH_ATTEMPTS = 6
# Passes over one block before the feed gives it up (logged and counted) and moves on: a
# block no upstream serves for ~30 passes (over a minute) is not coming, and waiting longer
# would hold every later block from every listener.
FEED_BLOCK_PASSES = 30
# Blocks after an upstream said it lacks eth_getBlockReceipts before the feed asks again:
# another upstream of the pool (or the same one, upgraded) may serve it; once per BSC
# five minutes costs one failed call.
FEED_RECEIPTS_RETRY_BLOCKS = 100
# Largest message taken from an upstream's pending-transaction stream: a hash
# notification is ~200 B, so this only bounds what a broken upstream can make us hold.
PENDING_MAX_MESSAGE = 64 * 1024

# --- Relay tree (feed frames between nodes; see tree/session.py) ------------------------
# Frames each stream's backlog holds: ~6 minutes of BSC blocks (0.75 s), 2 of Arbitrum's
# (4 a second); a restarted node or a reconnecting child resumes from it without JSON-RPC.
TREE_BACKLOG_FRAMES = 512
# Bytes of one stream's backlog: 512 compressed full blocks of a busy BSC block (~250 KB
# each, corpus-sized) fit; a stream of bigger frames keeps fewer of them.
TREE_BACKLOG_BYTES = 256 * MiB
# Live frames a child may fall behind before it is told "lagging" and closed: ~100 s of
# BSC; a child that far behind resumes faster from its position than from a queue.
TREE_CHILD_QUEUE_FRAMES = 128
# The same bound in bytes: what one slow child may keep the backlog "owing" it.
TREE_CHILD_QUEUE_BYTES = 32 * MiB
# Bytes written into a child's socket buffer before the fan-out skips it until it drains:
# a few frames in flight keep a distant child's link full without one child pinning RAM.
TREE_CHILD_BUFFER_BYTES = 4 * MiB
# Identities remembered for dedup: well past a backlog's worth, so a parent replaying its
# whole backlog after a reconnect never brings a frame back as new.
TREE_DEDUP_ENTRIES = 8192
# Largest frame taken from a parent: a full 140M-gas BSC block with receipts is ~10 MB of
# JSON, ~3 MB compressed.
TREE_MAX_FRAME_BYTES = 16 * MiB
# Largest payload a frame may unpack to (the lz4-bomb bound): 6x the largest JSON above.
TREE_MAX_PAYLOAD_BYTES = 64 * MiB
# Children one node serves: a leaf node with 1,000 subscribers is the benchmarked case;
# ten times that keeps room without letting connections exhaust file descriptors.
TREE_MAX_CHILDREN = 10_000
# Frames this many positions older than the newest accepted are dropped as stale: past the
# reorg window no node acts on them, so they could only be replays of forgotten frames.
TREE_STALE_POSITIONS = 1024
# A child that upgraded to the feed but sent no hello within this long is closed (4400):
# a hello is the first thing a child sends; an idle upgrade only holds a child's place.
TREE_HELLO_TIMEOUT = 10.0
# Bytes of blocks a node holds from frames before its block follower takes them (most are
# taken within a block time; a restart's replay and side forks wait): 64 corpus-sized
# blocks, raw. Past it the oldest are dropped and fetched from a parent if ever needed.
OFFERED_MAX_BYTES = 64 * MiB
# Parents a node keeps, each in another region: one may die without a missed frame.
TREE_PARENTS = 2
# Frames a node asks a parent to replay when it starts with nothing: its own children can
# then resume across its restart from its backlog (a minute of BSC).
TREE_RESUME_LAST = 64
# Seconds between round-trip probes of candidate parents: a failed parent is replaced by
# its link's own reconnect first; re-choosing by distance can wait this long.
TREE_PROBE_INTERVAL = 5.0
# A parent is replaced by a closer one only when its round trip is this many times the
# other's and ...
TREE_DEGRADE_FACTOR = 2.0
# ... at least this many seconds worse: no flapping between two parents of one region.
TREE_MIN_GAIN = 0.02
# A round-trip probe of a candidate parent not answered within this long failed: an
# intercontinental round trip is ~0.3 s; a parent ten times slower is no parent to choose.
TREE_PROBE_TIMEOUT = 3.0
# Failed probes in a row that make a candidate parent down: one lost probe on a busy link
# is noise; two in a row, a probe interval apart, is an outage.
TREE_PROBE_FAILURES_DOWN = 2
# Failed connects in a row (no welcome) that make a linked parent down: its link's own
# back-off has tried for a few seconds by then, and the other parents serve meanwhile.
TREE_LINK_FAILURES_DOWN = 3
# Seconds a parent whose feed kept failing stays down whatever its probes say: six default
# probe rounds, so a parent with a broken feed costs one failed link per half minute.
TREE_DOWN_HOLD = 30.0
# Seconds between looks at the parents' links between probe rounds: a dead parent's link
# reaches TREE_LINK_FAILURES_DOWN within about a second of back-off, and is replaced at
# most this much later instead of up to a probe interval later; a look reads two ints.
TREE_LINK_CHECK_INTERVAL = 0.25
# Probe rounds in a row in which a linked parent sent no frame while another parent did,
# before it counts as down (stalled): three rounds are 15 s by default, 5 to 20 BSC blocks
# that only the other parent brought.
TREE_STALL_ROUNDS = 3
# Connecting to a parent (TCP + WebSocket handshake) gives up after this: three
# intercontinental round trips and then some.
TREE_CONNECT_TIMEOUT = 5.0
# First delay before reconnecting to a parent, doubled per failure up to the max.
TREE_RETRY_DELAY = 0.25
TREE_RETRY_MAX = 5.0
# WebSocket pings to a parent: measure its round trip and find a dead link within two.
TREE_PING_INTERVAL = 2.0

# --- Relay tree: who a feed child is (see tree/auth.py, tree/admission.py) ------------------
# Anonymous feed sessions (no proof of a ``child_keys`` key) one address may hold; IPv6
# addresses count by /64 (what one subscriber line gets). A host running a few
# subscribers, or a small office behind one NAT, fits; each session draws ~265 KB a BSC
# block, so 32 are ~11 MB/s from one address, not the node's whole uplink.
TREE_ANON_PER_ADDRESS = 32
# Anonymous feed sessions the node holds in all: 80% of TREE_MAX_CHILDREN, so subscribers
# can never take the places of the relays it serves (the other 2,000).
TREE_ANON_MAX_SESSIONS = 8_000
# Seconds one address waits per new anonymous session once it opened TREE_ANON_PER_ADDRESS
# of them in a burst: every (re)connect replays up to TREE_RESUME_LAST frames (~17 MB of
# BSC blocks), so a client in a reconnect loop is held to one replay a second.
TREE_ANON_RECONNECT_COOLDOWN = 1.0
# Addresses with no session open whose cooldown is still remembered: an entry is ~200 B,
# so a flood from this many addresses costs ~2 MB; past it the least recently seen is
# forgotten (it gets a fresh burst: one flood's worth, not a way around the cap).
TREE_ANON_IDLE_ADDRESSES = 10_000

# --- Subscriber library (chainrelay.subscriber, ``chainrelay subscribe``) ------------------
# Its links use the TREE_* frame, dedup and reconnect limits above, as a node's do.
# Blocks waiting for the consumer: ~3 minutes of BSC; a consumer further behind is
# resynchronised from its parents' backlogs instead of holding more here.
SUBSCRIBER_QUEUE_BLOCKS = 256
# Frame bytes of those blocks (compressed: a block is unpacked when the consumer takes it):
# 256 corpus-sized frames (~250 KB) fit; a stream of bigger frames queues fewer.
SUBSCRIBER_QUEUE_BYTES = 64 * MiB
# One JSON-RPC backfill call (a full block and its receipts, in one batch) gives up after
# this: the largest block from a distant parent.
SUBSCRIBER_BACKFILL_TIMEOUT = 10.0
# Rounds over every parent's endpoint for one missing block, waiting TREE_RETRY_DELAY
# doubling to TREE_RETRY_MAX between them: ~20 s for a block a parent has yet to fetch.
SUBSCRIBER_BACKFILL_ROUNDS = 8

# --- L2 batches (ingress, batch streams in the tree; see batches/rules.py) -------------
# Largest batch payload an ingress takes: Arbitrum's poster caps a calldata batch at ~100 KB
# and a blob batch at 6 blobs of 128 KiB (768 KiB); 1 MiB holds either with room.
BATCH_MAX_PAYLOAD_BYTES = 1 * MiB
# Batches one group commit writes at most: 2 KB batches at 5,000/s arrive ~5 per ms, so a
# 1-5 ms fsync gathers far fewer; the bound only caps one transaction's work.
BATCH_COMMIT_MAX_BATCHES = 4096
# Bytes one group commit writes at most: 16 full-size batches; a larger group waits.
BATCH_COMMIT_MAX_BYTES = 16 * MiB
# Pushes one sequencer connection may have in flight (accepted, not yet acknowledged):
# ~1 s of 5,000 batches/s; past it the connection stops being read until acks go out.
BATCH_MAX_IN_FLIGHT = 8192
# Accepted payload hashes each stream keeps in memory for duplicate checks without a log
# read: more than a sequencer resends after any reconnect.
BATCH_RECENT_HASHES = 65_536
# Seconds an acknowledgement that waits for relays to hold a batch waits at most: then
# the batch is answered durable here but not held by enough relays (-32046).
BATCH_RELAY_ACK_TIMEOUT = 10.0
# Frames a batch stream's backlog holds: ~20 s of 5,000 batches/s; older ones are read
# from an ingress node's durable log through the range endpoint.
BATCH_BACKLOG_FRAMES = 100_000
# Bytes of that backlog: 256 full 1 MiB batches, or all of the frames above at 2 KB.
BATCH_BACKLOG_BYTES = 256 * MiB
# Live batches a child may fall behind before it is told "lagging": ~3 s of 5,000 batches/s
# (a block stream's 128 frames would be 25 ms of batches); the bytes bound still applies.
BATCH_CHILD_QUEUE_FRAMES = 16_384
# Batches a relay holds past a missing one while it waits for it (from another parent, or
# fetched): ~2 s of 5,000/s; past it the relay fetches the missing ones at once.
BATCH_ORDER_MAX_HELD = 10_000
# Bytes of those held batches.
BATCH_ORDER_MAX_HELD_BYTES = 64 * MiB
# Seconds a relay waits for a missing batch from its other parents before fetching it from
# a parent's range endpoint: two parents' copies are apart by their link delays (<0.3 s).
BATCH_ORDER_WAIT = 1.0
# Fetches of a missing batch that bring nothing before a relay passes over it (its
# children then fetch it themselves), order_wait apart: a parent restarting is back by then.
BATCH_FETCH_ROUNDS = 3
# Frames one range answer holds at most: a subscriber resuming far back pages through
# the durable log in answers this large.
BATCH_RANGE_MAX_FRAMES = 1000
# Bytes one range answer holds at most (frames are never split; one frame may pass it).
BATCH_RANGE_MAX_BYTES = 8 * MiB
# Seconds a range request to a parent waits (it may climb to an ingress node).
BATCH_RANGE_TIMEOUT = 10.0

# --- Batch subscriber (chainrelay.batchsubscriber, ``chainrelay subscribe --stream X/batches``)
# Its links use the TREE_* frame and reconnect limits, its range fetches BATCH_RANGE_MAX_FRAMES
# and BATCH_RANGE_TIMEOUT, and its rounds over the nodes SUBSCRIBER_BACKFILL_ROUNDS.
# Batches waiting for the consumer: ~2 s of 5,000 batches/s, so a relay's replay of a
# backlog arrives whole while the consumer reads fetched ones; further behind, resync.
BATCH_SUBSCRIBER_QUEUE_BATCHES = 10_000
# Payload bytes of those batches (checked and unpacked on arrival): 64 full 1 MiB batches.
BATCH_SUBSCRIBER_QUEUE_BYTES = 64 * MiB
# Largest batch payload taken: 16 times an ingress's default limit, so an ingress set for
# larger batches still reaches its subscribers; still the lz4-bomb bound of one frame.
BATCH_SUBSCRIBER_MAX_PAYLOAD_BYTES = 16 * MiB
# Largest range answer read: BATCH_RANGE_MAX_BYTES of a node set four times larger, plus
# one frame past it (an answer never splits a frame).
BATCH_SUBSCRIBER_RANGE_MAX_BYTES = 32 * MiB + TREE_MAX_FRAME_BYTES

# --- Publisher (chainrelay.publisher, ``chainrelay publish``) ------------
# Pushes in flight (sent, unanswered) per ingress connection: 5,000 batches/s with 5 ms
# acks keep ~25 in flight; 1024 keeps a 200 ms intercontinental link full, and stays far
# below BATCH_MAX_IN_FLIGHT, where the ingress stops reading.
PUBLISHER_WINDOW = 1024
# Bytes of batches no ingress has acknowledged yet (push/submit wait or refuse past it),
# and of one connection's resend queue: 256 full 1 MiB batches, ~128k batches of 2 KB.
PUBLISHER_MAX_UNACKED_BYTES = 256 * MiB
# Largest message an ingress sends back: an answer is one JSON line of a few hundred bytes.
PUBLISHER_MAX_MESSAGE_BYTES = 64 * 1024
# Resends in a row (a gap or "not durable" answered for a batch this connection holds)
# without an acknowledgement in between before the batch fails: a node that keeps losing
# the same batches is broken, not restarting.
PUBLISHER_RESYNC_LIMIT = 3
# TCP + WebSocket handshake to an ingress: three intercontinental round trips and then some.
PUBLISHER_CONNECT_TIMEOUT = 5.0
# First delay before reconnecting to an ingress, doubled per failed connect up to the max:
# a restarted ingress (sqlite WAL recovery, ~1 s) is found within ~0.2 s of being back.
PUBLISHER_RETRY_DELAY = 0.1
PUBLISHER_RETRY_MAX = 2.0
# Seconds with no ingress connected before waiting batches fail: long enough for an ingress
# node to be restarted by its supervisor, short enough for a sequencer to notice and alert.
PUBLISHER_GIVE_UP_AFTER = 60.0
# WebSocket pings to an ingress: a dead link (no pong) is found within two of them.
PUBLISHER_PING_INTERVAL = 5.0

# --- Status page (admin listener: /status, /status.json) ---------------------------------
# Seconds of per-second samples kept for the page's plots: five minutes show a trend across
# a few hundred blocks, and cost ~300 small records (about 100 KB).
STATUS_HISTORY = 300
# Children listed by name in /status.json (relays first); the rest are counted. A hub may
# serve 10,000 children: listing them all would make a once-a-second answer of megabytes.
STATUS_MAX_CHILDREN = 200

# --- Nitro's sequencer feed (chainrelay/nitro; Nitro's broadcast protocol at both ends) ----
# The port a leaf serves Nitro's feed protocol on: Nitro's own relay's (--node.feed.output.port).
NITRO_LISTEN = ":9642"
# The stream the feed travels the tree in: one frame per feed message, position = seq.
NITRO_STREAM = "arbitrum/nitro-feed"
# Largest broadcast message taken from an input (a WebSocket message): a feed message holds
# one L2 block's transactions, under ~100 KB on Arbitrum One; a backlog replay may put many
# in one broadcast. Past it the input is closed (1009) and reconnected from the next number.
NITRO_MAX_MESSAGE_BYTES = 16 * MiB
# Feed messages an input may run ahead of a missing one before the newest are refused:
# ~40 minutes of Arbitrum's ~4 messages a second; they come again after the reconnect.
NITRO_ORDER_MAX_HELD = 10_000
# Bytes of those held messages.
NITRO_ORDER_MAX_HELD_BYTES = 64 * MiB
# Seconds a missing message may stay missing (no input sent it) before every input is
# reconnected from it: a sequencer sends ~4 a second, so 2 s is 8 messages late.
NITRO_GAP_WAIT = 2.0
# First delay before reconnecting to an input, doubled per failed connect up to the max
# (Nitro's broadcastclient backs off the same way, from 50 ms to a few seconds).
NITRO_RETRY_DELAY = 0.1
NITRO_RETRY_MAX = 5.0
# TCP + TLS + WebSocket handshake to an input: three intercontinental round trips and more.
NITRO_CONNECT_TIMEOUT = 10.0
# Feed connections one client address may hold at the Nitro endpoint (Nitro's relay:
# --node.feed.output.connection-limits.per-ip-limit, 5; a region's NAT may hold more).
NITRO_MAX_CONNECTIONS_PER_IP = 16
# Feed connections the Nitro endpoint holds in all: each costs a task and its socket buffers.
NITRO_MAX_CONNECTIONS = 20_000
# Messages a client may fall behind the newest before it is disconnected (Nitro's relay:
# --node.feed.output.max-send-queue, 4096); it reconnects with its next number.
NITRO_SEND_QUEUE_MESSAGES = 4096
# Seconds one send to a client may take (its socket full) before it is disconnected: Nitro's
# relay drops a client that has not read for --node.feed.output.client-timeout, 15 s.
NITRO_SEND_TIMEOUT = 15.0
# Bytes queued in one client's socket before a send waits: ~10 large messages.
NITRO_WRITE_BUFFER_BYTES = 1 * MiB
# Decoded feed messages the endpoint keeps for its clients' replays and live sends: every
# client behind by less reads them from memory, not from frames (~2 minutes at 4/s).
NITRO_RECENT_MESSAGES = 512
# Feed messages read from the tree's range endpoint per page when a client asks for a number
# no longer held here (each page climbs to the nearest node that holds it).
NITRO_RANGE_PAGE = 256
# Older feed messages (past the recent ones) the endpoint keeps wrapped for every client
# catching up, in bytes: pages read once from the backlog or the range endpoint are shared
# by all clients, so a client behind costs no copy of its own (each holds at most
# NITRO_WRITE_BUFFER_BYTES of them at a time); also the bound of the compressed copies kept.
NITRO_RANGE_CACHE_BYTES = 32 * MiB
# Pages of older messages read at once for the endpoint's clients (each up to
# BATCH_RANGE_MAX_BYTES in flight, twice: the answer and its messages): what many clients
# asking for many old numbers at once can make the node hold is this many pages.
NITRO_RANGE_LOADS = 2
# Retention of the feed in an entry node's batch log: the range endpoint serves a resume this
# far back. Messages kept at least (~3 days of Arbitrum's ~4 a second)...
NITRO_LOG_KEEP_MESSAGES = 1_000_000
# ...and for how long (seconds): older ones go even within the count (3 days).
NITRO_LOG_KEEP_SECONDS = 3 * 24 * 3600.0
# Seconds between retention passes: each deletes at most batches.log.TRIM_ROWS records.
NITRO_LOG_TRIM_INTERVAL = 60.0

# --- block intake in slices of the event loop (chainrelay/slices.py) -----------------------
# Longest the block intake (decoding a large answer, splitting a block, warming the cache,
# holding its logs) runs before it lets the event loop run: a timer due every 5 ms is then
# late by about this much at most, against 5-13 ms for one orjson.loads of 2 MB of receipts.
LOOP_SLICE_SECONDS = 0.0005
# The cyclic garbage collector's thresholds in a serving process (``gc.set_threshold``:
# allocations before a young collection, young collections before a middle one, middle
# ones before a full one; Python's are 700, 10, 10). A busy chain's block is taken in a
# slice at a time (``LOOP_SLICE_SECONDS``), its decoded objects alive meanwhile: a middle
# collection after 10 young ones walked up to 7,000 of them at once, up to 7-15 ms, over
# 2 ms in half of them; after 3, up to 4-5 ms, over 2 ms in one in ten. A full collection
# walks all the node made since start: after 100 middle ones, 2-3 came in 150 s of 1 MB
# blocks (`intake_lag --pin`) instead of 6-10. It collects cyclic garbage only (the rest
# is freed as it is dropped), so fewer of them hold little more memory.
GC_THRESHOLDS = (700, 3, 100)
# An upstream answer (or a cached result the follower reads back) this large is decoded
# piecewise (chainrelay/wire/pieces.py), a slice at a time; a smaller one is one
# orjson.loads of under ~1 ms, cheaper in all (piecewise costs 2-2.5x orjson's CPU time).
LARGE_ANSWER_BYTES = 256 * 1024
# Items of a decoded list freed between two looks at the slice's clock (``slices.let_go``):
# a receipt or transaction with all it holds is 2-3 µs to free, so ~0.15 ms.
LET_GO_STEP = 64
# Bytes the piecewise decoder decodes between two looks at the slice's clock: ~0.1 ms.
DECODE_STEP_CHARS = 16 * 1024
