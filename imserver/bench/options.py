# -*- test-case-name: tests.test_bench -*-
"""
The command-line options every scenario shares, and the limits they are
checked against: loopback targets only, connections within the per-process
file budget, client connections spread over enough workers and source
addresses.
"""

import importlib.util
import ipaddress
import math
import os
import resource
import shutil

from twisted.python import usage

from imserver import commandline
from imserver.bench.arrivals import KINDS as ARRIVALS

#: Connections one worker process holds by default.
CONNECTIONS_PER_WORKER = 15000
#: Connections one source address carries by default (the ephemeral port
#: range is about 28,000 ports per source address).
CONNECTIONS_PER_SOURCE = 10000
#: The most connections one source address may carry.
MAX_CONNECTIONS_PER_SOURCE = 20000
#: Files a process keeps for itself beyond its connections (libraries,
#: pipes, the database, logs).
FILE_RESERVE = 1000
#: Source addresses are 127.0.0.2 up to 127.0.0.(1 + this).
MAX_SOURCES = 250
#: The default C{--timeout}, in seconds...
TIMEOUT = 120.0
#: ... or one second per this many users if longer: connecting 100,000
#: users across gates takes over 120 s on 2 cores.
USERS_PER_TIMEOUT_SECOND = 500
#: The C{--transport}s over WebSocket (the gate's C{--web} listener).
WEBSOCKET_TRANSPORTS = ("ws", "wss")
#: The C{--transport}s of the scenarios that also run over WebSocket.
ALL_TRANSPORTS = ("tcp", "tls") + WEBSOCKET_TRANSPORTS
#: A cap on the file limit when the hard limit is unlimited.
_FILES_CAP = 1 << 20
#: Where C{redis-server} is looked for after C{$PATH} (Debian installs it in
#: C{/usr/bin}, some systems in an C{sbin}).
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def redisServer():
    """
    The C{redis-server} program the bench starts for C{--gates} > 1.

    @return: its path, or L{None} if it is not installed.
    """
    path = os.pathsep.join([os.environ.get("PATH", os.defpath)] + list(_SBIN))
    return shutil.which("redis-server", path=path)


def redisCli():
    """
    The C{redis-cli} program the bench runs for C{--redis-cluster}.

    @return: its path, or L{None} if it is not installed.
    """
    path = os.pathsep.join([os.environ.get("PATH", os.defpath)] + list(_SBIN))
    return shutil.which("redis-cli", path=path)


def fileLimit():
    """
    The number of files a process of the bench may open: the hard
    C{RLIMIT_NOFILE} (L{raiseFileLimit} lifts the soft limit to it, and the
    children inherit it).
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return _FILES_CAP if hard == resource.RLIM_INFINITY else min(hard, _FILES_CAP)


def raiseFileLimit():
    """
    Lift this process's soft C{RLIMIT_NOFILE} to L{fileLimit}; processes
    spawned afterwards inherit it.
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (fileLimit(), hard))


def cpuCount(cpus):
    """
    How many CPUs a C{taskset} CPU list names.

    @param cpus: C{"1"}, C{"1-3"}, C{"0,2"}...; C{""} or L{None} (not
        pinned) for every CPU this process may run on.
    @raise usage.UsageError: if C{cpus} is not such a list.
    """
    if cpus in (None, ""):
        return len(os.sched_getaffinity(0))
    count = 0
    for part in str(cpus).split(","):
        first, dash, last = part.partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            high = low = -1
        if not 0 <= low <= high:
            raise usage.UsageError("{!r} is not a CPU list (0, 1-3, 0,2)".format(cpus))
        count += high - low + 1
    return count


def loopback(text, what="--host"):
    """
    Check that C{text} is a loopback IP address (127.0.0.0/8 or ::1): the
    bench never sends load anywhere else.

    @param what: names the value in the error.
    @return: the address, normalised.
    @raise usage.UsageError: if it is not a loopback IP address (host names
        are refused too: they may resolve anywhere).
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise usage.UsageError(
            "{} {!r} is not an IP address: the bench only loads loopback addresses".format(
                what, text
            )
        )
    if not address.is_loopback:
        raise usage.UsageError(
            "{} {} is not a loopback address: the bench never loads another machine".format(
                what, text
            )
        )
    return str(address)


def sourceAddresses(host, count):
    """
    The source addresses client connections are spread over.

    @param host: the (loopback) target address.
    @param count: how many.
    @return: C{127.0.0.2} up to C{127.0.0.(1 + count)} for an IPv4 target;
        C{[None]} (the kernel's choice) for C{::1}, the only IPv6 loopback
        address.
    """
    if ipaddress.ip_address(host).version == 6:
        return [None]
    return ["127.0.0.{}".format(2 + i) for i in range(count)]


def overTLS(transport):
    """
    Whether C{--transport} C{transport} runs over TLS (C{tls}, C{wss}).
    """
    return transport in ("tls", "wss")


def isWebSocket(transport):
    """
    Whether C{--transport} C{transport} is a WebSocket (C{ws}, C{wss}).
    """
    return transport in WEBSOCKET_TRANSPORTS


def listenDescription(transport, host):
    """
    The Twisted endpoint string a bench server listens on: port 0 (any free
    port) on C{host}, plain TCP or TLS (C{tls}, and C{wss} for the gate's
    web listener).
    """
    escaped = host.replace(":", "\\:")
    if overTLS(transport):
        return "ssl:0:interface={}".format(escaped)
    kind = "tcp6" if ":" in host else "tcp"
    return "{}:0:interface={}".format(kind, escaped)


class BaseOptions(commandline.Options):
    """
    The options of every scenario.

    Subclasses add their own C{optParameters} and check them in
    L{postOptions} after calling this one.

    @cvar pairs: whether the scenario needs users in sender/receiver pairs
        (an even number of them).
    @cvar transports: the C{--transport}s the scenario runs over.
    """

    pairs = False
    transports = ("tcp", "tls")

    optParameters = [
        ["users", "u", 400, "Connections (one user each).", int],
        [
            "transport",
            None,
            "tcp",
            "tcp or tls (TLS 1.3, the gate's self-signed certificate); hold, ping and p2p also "
            "take ws or wss (WebSocket on the gate's --web listener, wss over TLS).",
        ],
        [
            "store",
            None,
            "sqlite",
            "Gate store: sqlite, memory, or redis (cluster mode: the bench starts its own"
            " redis-server; always with --gates > 1).",
        ],
        [
            "gates",
            None,
            1,
            "Gate processes (cluster mode when > 1: the bench starts its own redis-server, and "
            "each pair of users spans two gates).",
            int,
        ],
        [
            "redis-cluster",
            None,
            0,
            "Run the gates on a Redis Cluster of this many primaries (3 or more; no replicas) "
            "that the bench starts, instead of one redis-server.",
            int,
        ],
        [
            "redis-replicas",
            None,
            0,
            "With Redis: start a replica of it too (0 or 1), e.g. for "
            "--gate-option=--redis-wait-replicas=1.",
            int,
        ],
        ["host", None, "127.0.0.1", "Loopback address the servers listen on (127.x or ::1)."],
        [
            "workers",
            None,
            None,
            "Client worker processes (default: enough for at most {:,} connections each).".format(
                CONNECTIONS_PER_WORKER
            ),
            int,
        ],
        [
            "sources",
            None,
            None,
            "Source addresses 127.0.0.2... to spread connections over (default: one per "
            "{:,} connections).".format(CONNECTIONS_PER_SOURCE),
            int,
        ],
        ["connect-window", None, 200, "Connection attempts in progress per worker.", int],
        [
            "timeout",
            None,
            None,
            "Seconds any phase (connecting, a storm's recovery, stopping) may take (default: "
            "{:.0f}, or one per {} users if more).".format(TIMEOUT, USERS_PER_TIMEOUT_SECOND),
            float,
        ],
        ["server-cpu", None, "0", "CPU to pin the servers to ('' for none)."],
        ["client-cpu", None, "1", "CPU to pin the workers to ('' for none)."],
        ["json", None, None, "Also write the result to this file."],
        ["plot", None, None, "Write PNG charts into this directory (needs matplotlib)."],
    ]

    def __init__(self):
        usage.Options.__init__(self)
        self["reference"] = True
        self["gate-options"] = []

    def opt_gate_option(self, option):
        """
        One more argument for every gate's twistd im, e.g.
        --gate-option=--store-commit-delay=0 (repeatable).
        """
        if not option.startswith("--"):
            raise usage.UsageError("--gate-option takes a long option: --name=value")
        self["gate-options"].append(option)

    def opt_reference(self):
        """
        Also measure the raw echo reference; report ratios (default).
        """
        self["reference"] = True

    def opt_no_reference(self):
        """
        Skip the echo reference.
        """
        self["reference"] = False

    def postOptions(self):
        users = self["users"]
        if users < 1 or (self.pairs and users % 2):
            raise usage.UsageError(
                "--users must be an even number >= 2" if self.pairs else "--users must be >= 1"
            )
        gates = self["gates"]
        if gates < 1:
            raise usage.UsageError("--gates must be >= 1")
        if self["store"] not in ("sqlite", "memory", "redis"):
            raise usage.UsageError("--store is sqlite, memory or redis")
        if gates > 1:
            self["store"] = "redis"
        if self["redis-cluster"]:
            if self["redis-cluster"] < 3:
                raise usage.UsageError("--redis-cluster is 3 primaries or more")
            if self["redis-replicas"]:
                raise usage.UsageError("--redis-replicas does not go with --redis-cluster")
            if redisCli() is None:
                raise usage.UsageError(
                    "--redis-cluster needs redis-cli (Debian package redis-tools)"
                )
            self["store"] = "redis"
        if self["redis-replicas"] not in (0, 1):
            raise usage.UsageError("--redis-replicas is 0 or 1")
        if self["redis-replicas"] and self["store"] != "redis":
            raise usage.UsageError("--redis-replicas goes with --store redis or --gates > 1")
        if self["store"] == "redis" and redisServer() is None:
            raise usage.UsageError(
                "--gates > 1 and --store redis run the gates in cluster mode and need "
                "redis-server (Debian package redis-server), which is not installed"
            )
        budget = fileLimit() - FILE_RESERVE
        if math.ceil(users / gates) > budget:
            raise usage.UsageError(
                "--users {:,} over {} gate(s) exceeds the {:,} files a gate may hold "
                "(RLIMIT_NOFILE {:,}): use more --gates".format(users, gates, budget, fileLimit())
            )
        if self["transport"] not in self.transports:
            if self["transport"] in WEBSOCKET_TRANSPORTS:
                raise usage.UsageError(
                    "--transport {} (WebSocket) is for the hold, ping and p2p scenarios only; "
                    "this one takes {}".format(self["transport"], _alternatives(self.transports))
                )
            raise usage.UsageError("--transport is {}".format(_alternatives(self.transports)))
        self["host"] = loopback(self["host"])
        for option in ("server-cpu", "client-cpu"):
            cpuCount(self[option])
        self._checkWorkers(users)
        self._checkSources(users)
        if self["connect-window"] < 1:
            raise usage.UsageError("--connect-window must be >= 1")
        if self["timeout"] is None:
            self["timeout"] = max(TIMEOUT, users / USERS_PER_TIMEOUT_SECOND)
        if self["timeout"] <= 0:
            raise usage.UsageError("--timeout must be > 0")
        if self["plot"] and importlib.util.find_spec("matplotlib") is None:
            raise usage.UsageError("--plot needs matplotlib: pip install imserver[bench]")

    def _checkWorkers(self, users):
        # A worker holds at most CONNECTIONS_PER_WORKER by default, within
        # the file budget.
        if self["workers"] is None:
            self["workers"] = math.ceil(users / CONNECTIONS_PER_WORKER)
        if not 1 <= self["workers"] <= max(1, users // 2):
            raise usage.UsageError("--workers must be between 1 and half of --users")
        budget = fileLimit() - FILE_RESERVE
        if math.ceil(users / self["workers"]) > budget:
            raise usage.UsageError(
                "more than {:,} connections per worker exceed its file limit: use more "
                "--workers".format(budget)
            )

    def _checkSources(self, users):
        ipv6 = ":" in self["host"]
        if self["sources"] is None:
            self["sources"] = 1 if ipv6 else math.ceil(users / CONNECTIONS_PER_SOURCE)
        sources = self["sources"]
        if ipv6 and sources != 1:
            raise usage.UsageError("::1 is the only IPv6 loopback address: --sources must be 1")
        if not 1 <= sources <= MAX_SOURCES:
            raise usage.UsageError("--sources must be between 1 and {}".format(MAX_SOURCES))
        if math.ceil(users / sources) > MAX_CONNECTIONS_PER_SOURCE:
            raise usage.UsageError(
                "more than {:,} connections per source address would run out of ephemeral "
                "ports: use more --sources".format(MAX_CONNECTIONS_PER_SOURCE)
            )


def _alternatives(names):
    """
    C{a, b or c}.
    """
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def checkSending(options, minimumBody):
    """
    Check the options of a scenario that sends messages: C{--inflight},
    C{--rate} and C{--body} (at least C{minimumBody} bytes, for the send
    timestamp; at most the gate's default body limit).

    @raise usage.UsageError: if one is out of range.
    """
    if options["inflight"] < 1:
        raise usage.UsageError("--inflight must be >= 1")
    if options["rate"] < 0:
        raise usage.UsageError("--rate must be >= 0")
    if not minimumBody <= options["body"] <= 32 * 1024:
        raise usage.UsageError("--body must be between {} and 32768".format(minimumBody))


class WindowOptions(BaseOptions):
    """
    The options of a scenario measured over a time window after a warm-up.
    """

    optParameters = [
        ["duration", "d", 10.0, "Seconds measured, after the warm-up.", float],
        ["warmup", None, 2.0, "Seconds run before measuring.", float],
    ]

    def postOptions(self):
        BaseOptions.postOptions(self)
        if not 0 < self["duration"] <= 3600:
            raise usage.UsageError("--duration must be in (0, 3600]")
        if not 0 <= self["warmup"] <= 600:
            raise usage.UsageError("--warmup must be in [0, 600]")


class OpenLoopOptions(WindowOptions):
    """
    The options of a scenario with an open loop: how its sends are spaced.
    """

    optParameters = [
        [
            "arrivals",
            None,
            ARRIVALS[0],
            "Open loop: how the sends are spaced: even (each sender on an evenly spaced schedule "
            "of its own, the senders' offsets spread), poisson (exponential gaps, the same mean "
            "rate, drawn with --seed) or burst (every 10 ms, all that are due: the bench's old "
            "ticker, for comparison). Latency is from each send's scheduled time.",
        ],
        ["seed", None, 0, "The random seed of --arrivals poisson.", int],
    ]

    def postOptions(self):
        WindowOptions.postOptions(self)
        if self["arrivals"] not in ARRIVALS:
            raise usage.UsageError("--arrivals is {}".format(_alternatives(ARRIVALS)))
