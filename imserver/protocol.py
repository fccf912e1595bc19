# -*- test-case-name: tests.test_protocol -*-
"""
The gate over TCP: one L{GateProtocol} per client connection (the transport
of its L{imserver.session.GateSession}), one L{GateFactory} per process
holding the shared state.
"""

import itertools
import random

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from imserver.errors import Unavailable
from imserver.framing import FrameProtocol
from imserver.groups import Groups
from imserver.limits import FailedAuthThrottle, TokenBucket, peerHost
from imserver.messaging import Messenger
from imserver.metrics import GateMetrics
from imserver.pb import im_pb2 as pb
from imserver.session import (  # noqa: F401 (the states, for importers)
    AUTHENTICATED,
    AUTHENTICATING,
    NEW,
    GateSession,
    SocketChannel,
)
from imserver.transport import closeBounded, noDelay
from imserver.wire import HEADER_LENGTH, encodeNotice, packLength


class GateProtocol(SocketChannel, FrameProtocol):
    """
    The TCP transport of one gate session (also under TLS and PROXY-protocol
    wrappers): splits the byte stream into frames for its L{GateSession},
    writes the session's frames with their length prefix, relays the
    socket's flow control, and closes within C{close_timeout}.

    @ivar session: the L{GateSession}, from C{connectionMade} on.
    """

    def __init__(self, factory, acceptedFrom):
        self.factory = factory
        self.acceptedFrom = acceptedFrom
        self.maxFrameLength = factory.settings.preauth_max_frame_length
        self._seconds = factory.clock.seconds
        self._metrics = factory.metrics
        self._closeTimer = None

    def __repr__(self):
        return "<GateProtocol {!r}>".format(self.session)

    @property
    def peer(self):
        """
        The client's address, as the transport gives it now.  Behind a
        C{haproxy:} listener that is the source address of the PROXY header
        once it has been read (before, and at C{connectionMade}, the
        proxy's own address); without a transport, the address the
        connection was accepted from.
        """
        if self.transport is None:
            return self.acceptedFrom
        return self.transport.getPeer()

    def connectionMade(self):
        noDelay(self.transport)
        self.startSession(self.factory, self.acceptedFrom)

    def dataReceived(self, data):
        self.session.lastHeard = self._seconds()
        metrics = self._metrics
        metrics.bytesReceived += len(data)
        metrics.framesReceived += FrameProtocol.dataReceived(self, data)

    def frameReceived(self, frame):
        self.session.frameReceived(frame)

    def writeFrame(self, data):
        if not self._closing:
            metrics = self._metrics
            metrics.framesSent += 1
            metrics.bytesSent += HEADER_LENGTH + len(data)
            self.transport.write(packLength(len(data)) + data)

    def writeMessage(self, encoded, seq, outgoing):
        """
        Write the C{message} push of inbox entry C{seq} of C{encoded} (an
        L{imserver.wire.EncodedMessage}): the push path of every delivery,
        prefix and all from the message's cache.
        """
        if not self._closing:
            data = encoded.streamFrame(seq, outgoing)
            metrics = self._metrics
            metrics.framesSent += 1
            metrics.bytesSent += len(data)
            self.transport.write(data)

    def closeWithError(self, code, message, seq=0):
        # Framing errors end the session like any other error.
        self.session.closeWithError(code, message, seq)

    def closeTransport(self):
        # A transport with a producer registered does not close until it
        # is unregistered.
        self.transport.unregisterProducer()
        self._closeTimer = closeBounded(
            self, self.factory.clock, self.factory.settings.close_timeout
        )

    def connectionLost(self, reason):
        self.connected = 0
        self._closing = True
        self.cancelCloseTimer()
        self.session.connectionLost(reason)


class GateFactory(Factory):
    """
    Shared state of one gate process: settings, seams and live connections.

    @ivar messenger: the L{Messenger} that stores and announces the
        messages of the sessions and of the HTTP API.
    @ivar groups: the L{Groups} that manages groups for both.
    @ivar connections: the L{GateSession} of every open connection,
        authenticated or not, that the gate has not decided to close.
    @ivar closing: the L{GateSession}s the gate closed whose connection is
        not closed yet (for at most C{close_timeout}).
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        settings,
        authenticator,
        registry,
        store,
        clock,
        gateId,
        rng=None,
        metrics=None,
        messenger=None,
        groups=None,
    ):
        """
        @param messenger: the L{Messenger} (default: one of C{store},
            C{registry}, C{clock}, C{settings} and the metrics).
        @param groups: the L{Groups} (default: one of C{store} and
            C{settings}).
        """
        self.settings = settings
        self.authenticator = authenticator
        self.registry = registry
        self.store = store
        self.metrics = metrics if metrics is not None else GateMetrics()
        if messenger is None:
            messenger = Messenger(store, registry, clock, settings, self.metrics)
        self.messenger = messenger
        self.groups = groups if groups is not None else Groups(store, settings)
        self.clock = clock
        self.gateId = gateId
        self.random = rng if rng is not None else random.SystemRandom()
        self.connections = set()
        self.closing = set()
        self.metrics.watch(self.connections, self.closing)
        self._perHost = {}
        self._accepts = TokenBucket(settings.accept_rate, max(1.0, settings.accept_rate), clock)
        self.authThrottle = FailedAuthThrottle(
            settings.auth_failure_rate, settings.auth_failure_burst, clock
        )
        self._dirtyCursors = {}
        self._ids = itertools.count(1)
        self._drained = None

    def refusal(self, host, others=0, othersFromHost=0):
        """
        Whether a new connection from C{host} is refused, and why: checked
        at accept, before TLS (L{imserver.limits.AdmissionFactory}).

        @param host: the peer address, or L{None} if unknown (not checked
            per address).
        @param others: open connections of the listener's own that are not
            sessions yet (the web listener's HTTP connections), counted as
            the gate's.
        @param othersFromHost: how many of them are from C{host}.
        @return: L{None} to take it, else the reason (a metrics label).
        """
        settings = self.settings
        # Connections being closed still hold a descriptor: they count
        # against the process (for at most close_timeout), not the address.
        if len(self.connections) + len(self.closing) + others >= settings.max_connections:
            return "max_connections"
        if (
            host is not None
            and self._perHost.get(host, 0) + othersFromHost >= settings.max_connections_per_ip
        ):
            return "max_connections_per_ip"
        if not self._accepts.take():
            return "accept_rate"
        return None

    def connectionOpened(self, session):
        """
        Count a new connection (in C{connectionMade}).
        """
        self.connections.add(session)
        host = peerHost(session.acceptedFrom)
        self._perHost[host] = self._perHost.get(host, 0) + 1

    def nextConnectionId(self):
        return next(self._ids)

    def buildProtocol(self, addr):
        return GateProtocol(self, addr)

    def cursorAdvanced(self, uid, deviceId, seq):
        """
        Remember a device's new cursor for the next L{flushCursors}.
        """
        key = (uid, deviceId)
        if self._dirtyCursors.get(key, -1) < seq:
            self._dirtyCursors[key] = seq

    def flushCursors(self):
        """
        Write every cursor advanced since the last flush, in one store
        operation.  Run every C{cursor_flush_interval}, and at shutdown.

        @return: a L{Deferred} firing when written (failures are logged and
            the cursors kept for the next flush).
        """
        if not self._dirtyCursors:
            return succeed(0)
        dirty, self._dirtyCursors = self._dirtyCursors, {}
        d = self.store.ack(
            [(uid, device, seq) for (uid, device), seq in dirty.items()],
            int(self.clock.seconds() * 1000),
        )

        def failed(failure):
            if failure.check(Unavailable):
                # An outage, not a bug: no traceback every flush.
                self.log.warn(
                    "writing {n} cursors postponed: {why}",
                    n=len(dirty),
                    why=failure.getErrorMessage(),
                )
            else:
                self.log.failure("writing {n} cursors failed", failure, n=len(dirty))
            for key, seq in dirty.items():
                if self._dirtyCursors.get(key, -1) < seq:
                    self._dirtyCursors[key] = seq
            return 0

        return d.addErrback(failed)

    def broadcast(self, body, contentType):
        """
        Send a system notice to every authenticated session of this gate;
        nothing is stored.  The frame is encoded once for all of them.

        @return: the number of sessions it was written to.
        """
        return self._writeNotice(self._notice(body, contentType))

    def broadcastAll(self, body, contentType):
        """
        Send a system notice to every authenticated session of every gate
        (L{broadcast} here, the others told through the registry first: if
        they cannot be, no session gets it and the caller may retry).

        @return: a L{Deferred} firing with C{(sessions, gates)}: the
            sessions of this gate it was written to, and the gates that got
            it, this one included; or failing with
            L{imserver.errors.Unavailable}.
        """
        frame = self._notice(body, contentType)

        def told(others):
            return self._writeNotice(frame), others + 1

        return maybeDeferred(self.registry.broadcast, frame).addCallback(told)

    def _notice(self, body, contentType):
        return encodeNotice(body, contentType, int(self.clock.seconds() * 1000))

    def _writeNotice(self, frame):
        # Not to a connection that is not reading its pushes (paused).
        sessions = [p for p in self.connections if p.delivering]
        for p in sessions:
            p.notice(frame)
        return len(sessions)

    def sweep(self):
        """
        Close every connection heard nothing from for C{idle_timeout}
        (C{IDLE_TIMEOUT}), and every one paused by a full write buffer for
        C{slow_consumer_grace} (C{SLOW_CONSUMER}).  One pass over the live
        connections; run every C{sweep_interval}.

        @return: the number of connections closed.
        """
        now = self.clock.seconds()
        deadline = now - self.settings.idle_timeout
        grace = self.settings.slow_consumer_grace
        idle, stuck = [], []
        for p in self.connections:
            if p.lastHeard <= deadline:
                idle.append(p)
            elif p.pausedSince is not None and now - p.pausedSince >= grace:
                stuck.append(p)
        self.metrics.idleCloses += len(idle)
        self.metrics.slowConsumerCloses += len(stuck)
        for p in idle:
            p.closeWithError(pb.IDLE_TIMEOUT, "nothing received for the idle timeout")
        for p in stuck:
            p.closeWithError(
                pb.SLOW_CONSUMER, "pushes not read for {} s; resume later".format(grace)
            )
        return len(idle) + len(stuck)

    def connectionClosing(self, session):
        """
        The gate decided to close C{session}: from now on it is not an open
        connection (gauges, idle sweep, broadcast) and its address's slot
        is free, though its socket may take up to C{close_timeout} to close.
        """
        if session in self.connections:
            self._forget(session)
            self.closing.add(session)

    def connectionClosed(self, session):
        """
        Forget a connection that is gone.
        """
        if session in self.connections:
            self._forget(session)
        else:
            self.closing.discard(session)
        if self._drained is not None and not self.connections and not self.closing:
            d, self._drained = self._drained, None
            d.callback(None)

    def _forget(self, session):
        self.connections.discard(session)
        host = peerHost(session.acceptedFrom)
        left = self._perHost[host] - 1
        if left:
            self._perHost[host] = left
        else:
            del self._perHost[host]

    def shutdown(self):
        """
        Tell every connection the server is stopping and close it; abort
        those still open after C{shutdown_grace}.  Stop listening first.

        @return: a L{Deferred} firing once every connection is gone.
        """
        if not self.connections and not self.closing:
            return succeed(None)
        self.log.info("closing {n} connections for shutdown", n=len(self.connections))
        self._drained = drained = Deferred()
        timer = self.clock.callLater(self.settings.shutdown_grace, self._abortAll)
        for p in list(self.connections):
            p.closeWithError(pb.SERVER_SHUTDOWN, "server shutting down")

        def finished(result):
            if timer.active():
                timer.cancel()
            return result

        return drained.addBoth(finished)

    def _abortAll(self):
        for p in list(self.connections) + list(self.closing):
            self.log.warn("aborting connection {conn}", conn=p.connectionId)
            p.channel.abort()
