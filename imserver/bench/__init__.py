# -*- test-case-name: tests.test_bench -*-
"""
C{im-bench}: the imserver load generator.

    python -m imserver.bench SCENARIO [options]

The scenarios (L{imserver.bench.scenarios}): C{fanout} (one sender to a
group of online members), C{hold} (heartbeating idle connections), C{p2p}
(1:1 durable delivery), C{ping} (RPC round trips) and C{storm} (mass
reconnect with backlog).  C{im-bench SCENARIO --help} lists each one's
options.

Processes: this one (the coordinator, L{imserver.bench.coordinator}; its
children in L{imserver.bench.processes}) starts its own C{twistd im}
(L{imserver.spawn}) pinned to C{--server-cpu}, with its HTTP API on a free
loopback port if the scenario uses it, then C{--workers} client processes
pinned to C{--client-cpu} (C{python -m imserver.bench worker}, driven over
JSON lines on their stdio, L{imserver.bench.control}).  Client connections
come from source addresses 127.0.0.2 and up, so no source/destination pair
runs out of ephemeral ports.  After the scenario the same workers drive a
raw Twisted echo server (L{imserver.bench.reference}) with the same
options, and the result gives the scenario's figures as ratios to it.

C{--transport} is C{tcp} or C{tls}; C{hold}, C{ping} and C{p2p} also run
over WebSocket (C{ws}, C{wss}: the gate's C{--web} listener, the clients
on L{imserver.bench.websocket}).

The result is JSON, on stdout and in C{--json FILE}; C{--plot DIR} also
draws charts.  Only loopback addresses are ever used; every run is bounded
by C{--duration} and C{--timeout} and stops by itself.

This module only dispatches, so the bench's child processes import no more
than they need.
"""

import sys

#: The hidden subcommand running a client worker.
WORKER_COMMAND = "worker"
#: The hidden subcommand running the echo reference server.
ECHO_COMMAND = "echo-server"
#: The hidden subcommand running the allow-all before-send backend
#: (C{p2p --before-send}).
ALLOW_ALL_COMMAND = "allow-all-server"


def runReactor(main, *args):
    """
    Run C{main(reactor, *args)} under L{twisted.internet.task.react}.

    @return: the exit status.
    """
    from twisted.internet.task import react

    try:
        react(main, args)
    except SystemExit as e:
        return e.code or 0
    return 0


def main(argv=None):
    """
    The C{im-bench} command, and the bench's child processes.

    @return: the exit status.
    """
    from imserver.bench.options import raiseFileLimit

    argv = sys.argv[1:] if argv is None else argv
    raiseFileLimit()
    if argv == [WORKER_COMMAND]:
        from imserver.bench.worker import main
    elif argv[:1] == [ECHO_COMMAND]:
        from imserver.bench.echo import main

        argv = argv[1:]
    elif argv[:1] == [ALLOW_ALL_COMMAND]:
        from imserver.bench.allowall import main

        argv = argv[1:]
    else:
        from imserver.bench.cli import main
    return main(argv)
