# -*- test-case-name: tests.test_chat -*-
"""
C{python -m imserver chat} put together: an L{imserver.client.IMClient}
connecting to the gate, the terminal, and a L{ChatSession} between them
(L{run}), on the global reactor (L{main}).
"""

import sys

from twisted.internet.defer import TimeoutError

from imserver.chat.session import ChatSession
from imserver.chat.terminal import TransportText, openTerminal

#: Reconnect backoff ceiling, in seconds: short, since someone is waiting.
MAX_RECONNECT_DELAY = 10.0
#: How long to wait for the terminal to take the last lines at exit.
OUTPUT_FLUSH_TIMEOUT = 2.0


class _WatchedEndpoint:
    """
    A client endpoint that reports connection attempts that fail, and
    connections that close before they are signed in (a TLS failure, for
    one), to C{onFailure}.
    """

    def __init__(self, endpoint):
        self._endpoint = endpoint
        self.onFailure = None

    def connect(self, factory):
        d = self._endpoint.connect(factory)
        d.addCallbacks(self._connected, self._failed)
        return d

    def _failed(self, failure):
        if self.onFailure is not None:
            self.onFailure(failure.value)
        return failure

    def _connected(self, protocol):
        def closed(reason):
            if protocol.session is None and self.onFailure is not None:
                self.onFailure(reason)

        protocol.whenClosed().addCallback(closed)
        return protocol


def run(reactor, config, stdin=0, stdout=1):
    """
    Chat until Ctrl-D, a kick or a refused token (the function
    L{twisted.internet.task.react} runs).

    @type config: L{imserver.chat.options.ChatConfig}
    @return: a L{Deferred} firing when done, failing with L{SystemExit}
        for a non-zero status.
    """
    from twisted.internet.stdio import StandardIO

    from imserver.client import IMClient, clientEndpoint, fullJitterBackoff

    if callable(config.token):

        def token():
            return config.token(reactor.seconds())
    else:
        token = config.token

    endpoint = _WatchedEndpoint(
        clientEndpoint(
            reactor, config.host, config.port, tls=config.tls, trustRoot=config.trustRoot
        )
    )
    client = IMClient(
        reactor,
        config.host,
        config.port,
        config.uid,
        token,
        config.deviceId,
        endpoint=endpoint,
        retryPolicy=fullJitterBackoff(0.5, MAX_RECONNECT_DELAY),
    )
    raw, terminal, restoreSignal = openTerminal(reactor, config.typing, stdin, stdout)
    stdio = StandardIO(terminal, stdin=stdin, stdout=stdout, reactor=reactor)
    session = ChatSession(
        reactor,
        client,
        TransportText(
            terminal if raw is not None else stdio, getattr(sys.stdout, "encoding", None) or "utf-8"
        ),
        config.uid,
        config.peer,
        where="{}:{}".format(config.host, config.port),
        group=config.group,
        sendTyping=config.typing,
        keepTrying=config.keepTrying,
        host=config.host,
        trusted=config.trusted,
    )
    terminal.session = session
    endpoint.onFailure = session.connectFailed

    def flushed(status):
        # Give the terminal back (its mode is about input only), let
        # standard output drain (bounded), then report the status.
        terminal.finish()
        restoreSignal()
        if raw is not None:
            raw.restore()
        stdio.loseConnection()
        d = terminal.closed.addTimeout(OUTPUT_FLUSH_TIMEOUT, reactor)
        d.addErrback(lambda f: f.trap(TimeoutError))

        def over(_):
            if status:
                raise SystemExit(status)

        return d.addCallback(over)

    return session.start().addCallback(flushed)


def main(config):
    """
    Run a chat on the global reactor.

    @type config: L{imserver.chat.options.ChatConfig}
    @return: the exit status.
    """
    from twisted.internet import fdesc, task

    try:
        task.react(run, (config,))
    except SystemExit as e:
        return e.code
    finally:
        # StandardIO leaves the terminal non-blocking; the shell should not
        # inherit that.
        for fd in (0, 1):
            try:
                fdesc.setBlocking(fd)
            except OSError:
                pass
    return 0
