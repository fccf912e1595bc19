# -*- test-case-name: tests.test_bench -*-
"""
The bench's app backend for C{p2p --before-send}: an HTTP server answering
every before-send check C{{"result":"allow"}} (docs/api.md, "Before-send
check"), so a run measures what the check costs the gate, not a backend's
logic.  The bench runs it as its own process, C{python -m imserver.bench
allow-all-server}, pinned with the gate, and passes its URL to the gate's
C{--before-send}.

It parses each request's JSON, as a real backend would, and counts the
requests; it logs nothing per request.
"""

import json
import sys

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from imserver import commandline
from imserver.bench import runReactor
from imserver.bench.echo import listenAddress
from imserver.bench.options import loopback

#: The path the gate posts to.
PATH = b"/before-send"
#: Every answer.
ALLOW = b'{"result":"allow"}'


class AllowAll(Resource):
    """
    Allows every send; answers C{400} to a body that is not a JSON object
    with a C{client_msg_id} (the gate never sends one).

    @ivar checks: the requests answered so far.
    """

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.checks = 0

    def render_POST(self, request):
        self.checks += 1
        try:
            value = json.loads(request.content.read())
        except ValueError:
            value = None
        if not isinstance(value, dict) or "client_msg_id" not in value:
            request.setResponseCode(400)
            return b"not a before-send request"
        request.setHeader(b"content-type", b"application/json")
        return ALLOW


class QuietSite(Site):
    """
    A L{Site} that writes no access log line.
    """

    noisy = False

    def log(self, request):
        pass


class AllowAllOptions(commandline.Options):
    """
    The options of C{allow-all-server}.
    """

    synopsis = "Usage: im-bench allow-all-server [options]"
    longdesc = (
        "The bench's before-send backend (started by im-bench p2p --before-send): answers "
        "every POST to " + PATH.decode() + ' with {"result":"allow"}.'
    )

    optParameters = [["host", None, "127.0.0.1", "Loopback address to listen on."]]

    def postOptions(self):
        self["host"] = loopback(self["host"])


def url(host, port):
    """
    The URL the gate's C{--before-send} is given.
    """
    return "http://{}{}".format(listenAddress(host, port), PATH.decode())


@inlineCallbacks
def serveAllowAll(reactor, options, out=sys.stdout):
    """
    Serve until the process is told to stop; write C{listening on
    HOST:PORT} to C{out} once listening on a free port.
    """
    host = options["host"]
    root = Resource()
    root.putChild(PATH[1:], AllowAll())
    site = QuietSite(root)
    if ":" in host:
        endpoint = TCP6ServerEndpoint(reactor, 0, backlog=4096, interface=host)
    else:
        endpoint = TCP4ServerEndpoint(reactor, 0, backlog=4096, interface=host)
    port = yield endpoint.listen(site)
    out.write("listening on {}\n".format(listenAddress(host, port.getHost().port)))
    out.flush()
    yield Deferred()


def main(argv):
    """
    The C{allow-all-server} subcommand.

    @return: the exit status.
    """
    options = AllowAllOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write("{}\n".format(e))
        return 2
    return runReactor(serveAllowAll, options)
