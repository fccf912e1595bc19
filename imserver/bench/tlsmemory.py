"""
What one server-side TLS connection's OpenSSL state holds in memory, with
the gate's own TLS context: C{python -m imserver.bench.tlsmemory}.

C{--count} server connections are made with L{imserver.tls.serverOptions}
(the context C{ssl:} listeners use) over memory BIOs, each completes a
handshake with a throwaway client and exchanges one small record each way,
then is kept while its client is dropped; the process's RSS growth over
C{--count} is the figure.  No sockets, no reactor: this isolates what
OpenSSL holds per connection from the gate's Python objects (compare
C{rss_per_connection_kb} of C{im-bench hold --transport tls}).  Variants:
C{--max-version 1.2}, C{--no-release-buffers} (Twisted sets
C{SSL_MODE_RELEASE_BUFFERS} on every context; this clears it).  Prints one
JSON object.
"""

import json
import sys

from OpenSSL import SSL
from twisted.python import usage

from imserver.tls import makeSelfSigned, serverOptions


class Options(usage.Options):
    optParameters = [
        ["count", "n", 3000, "Server connections kept.", int],
        ["max-version", None, "1.3", "Highest TLS version offered: 1.2 or 1.3."],
    ]
    optFlags = [["no-release-buffers", None, "Clear SSL_MODE_RELEASE_BUFFERS."]]

    def postOptions(self):
        if self["max-version"] not in ("1.2", "1.3"):
            raise usage.UsageError("--max-version is 1.2 or 1.3")


def _rssKB():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


def _pump(a, b):
    moved = True
    while moved:
        moved = False
        for source, sink in ((a, b), (b, a)):
            try:
                data = source.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                sink.bio_write(data)
                moved = True


def _step(connection):
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass


def measure(count, maxVersion="1.3", releaseBuffers=True):
    """
    @return: a L{dict}: the negotiated version and cipher, and the RSS
        growth per kept server connection in KB.
    """
    serverContext = serverOptions(*makeSelfSigned()).getContext()
    if not releaseBuffers:
        SSL._lib.SSL_CTX_clear_mode(serverContext._context, SSL.MODE_RELEASE_BUFFERS)
    if maxVersion == "1.2":
        serverContext.set_max_proto_version(SSL.TLS1_2_VERSION)
    clientContext = SSL.Context(SSL.TLS_METHOD)
    kept = []
    version = cipher = None
    before = _rssKB()
    for _ in range(count):
        server = SSL.Connection(serverContext, None)
        server.set_accept_state()
        client = SSL.Connection(clientContext, None)
        client.set_connect_state()
        for _ in range(4):
            _step(client)
            _pump(client, server)
            _step(server)
            _pump(server, client)
        client.send(b"x" * 100)
        _pump(client, server)
        server.recv(65536)
        server.send(b"y" * 100)
        _pump(server, client)
        client.recv(65536)
        version, cipher = server.get_protocol_version_name(), server.get_cipher_name()
        kept.append(server)
        del client
    after = _rssKB()
    return {
        "count": count,
        "tls_version": version,
        "cipher": cipher,
        "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii"),
        "release_buffers": releaseBuffers,
        "rss_per_connection_kb": round((after - before) / count, 2),
    }


def main(argv=None):
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print("{}\n{}".format(options, e), file=sys.stderr)
        return 2
    result = measure(options["count"], options["max-version"], not options["no-release-buffers"])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
