# -*- test-case-name: tests.test_bench -*-
"""
The reference server: a minimal raw Twisted server echoing length-prefixed
frames (4-byte big-endian length, then the payload), over plain TCP or TLS
(the gate's TLS profile).  The bench runs it as its own process, C{python
-m imserver.bench echo-server}; L{imserver.bench.reference} drives it.

It imports no more than it needs, so its memory is Twisted's own.
"""

import sys

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver
from twisted.python import usage
from twisted.python.filepath import FilePath

from imserver import commandline
from imserver.bench import runReactor
from imserver.bench.options import loopback


class Echo(Int32StringReceiver):
    """
    Answers every frame with itself.
    """

    MAX_LENGTH = 64 * 1024

    def stringReceived(self, data):
        self.sendString(data)


class EchoServerOptions(commandline.Options):
    """
    The options of C{echo-server}.
    """

    synopsis = "Usage: im-bench echo-server [options]"
    longdesc = (
        "The bench's reference server (started by im-bench itself): echoes"
        " length-prefixed frames over plain TCP, or TLS with --tls-cert."
    )

    optParameters = [
        ["host", None, "127.0.0.1", "Loopback address to listen on."],
        ["tls-cert", None, None, "PEM certificate: listen with TLS."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
    ]

    def postOptions(self):
        self["host"] = loopback(self["host"])
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")


def listenAddress(host, port):
    """
    C{host:port} as the gate logs its listeners (IPv6 in brackets).
    """
    return "{}:{}".format("[{}]".format(host) if ":" in host else host, port)


@inlineCallbacks
def serveEcho(reactor, options, out=sys.stdout):
    """
    Run the echo server until the process is told to stop; write
    C{listening on HOST:PORT} to C{out} once it listens on a free port.
    """
    host = options["host"]
    factory = Factory.forProtocol(Echo)
    factory.noisy = False
    if options["tls-cert"]:
        from imserver import tls

        contextFactory = tls.serverOptions(
            FilePath(options["tls-cert"]).getContent(), FilePath(options["tls-key"]).getContent()
        )
        endpoint = SSL4ServerEndpoint(reactor, 0, contextFactory, backlog=4096, interface=host)
    elif ":" in host:
        endpoint = TCP6ServerEndpoint(reactor, 0, backlog=4096, interface=host)
    else:
        endpoint = TCP4ServerEndpoint(reactor, 0, backlog=4096, interface=host)
    port = yield endpoint.listen(factory)
    out.write("listening on {}\n".format(listenAddress(host, port.getHost().port)))
    out.flush()
    yield Deferred()


def main(argv):
    """
    The C{echo-server} subcommand.

    @return: the exit status.
    """
    options = EchoServerOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write("{}\n".format(e))
        return 2
    return runReactor(serveEcho, options)
