# -*- test-case-name: tests.test_closing,tests.test_batchedwrites -*-
"""
What the gate needs of the socket under a protocol, whatever wraps it (TLS,
a PROXY-protocol header reader): the socket's own transport, and a close
that ends within a bound whatever the peer does.

Twisted's TLS transport closes by sending C{close_notify} and then waits
for the peer's C{close_notify} before it closes TCP: a peer that never
answers keeps the connection open forever.  L{closeBounded} does not wait
(TLS does not require it): once the C{close_notify} and every pending write
have left, it closes TCP, and it aborts the connection if that has not
happened within the bound (a peer that does not read).

(A half-close, FIN while still reading the peer's answer, would be gentler,
but Twisted's TLS transport cannot take it: when the peer's C{close_notify}
arrives on a half-closed socket, the socket's C{connectionLost} runs inside
the TLS layer's own read and it fails with an C{AttributeError}.)
"""

import socket
from collections.abc import Iterable
from typing import Any, cast

from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport, ITransport
from twisted.internet.protocol import Protocol
from zope.interface import directlyProvides, providedBy


def socketTransport(transport: ITransport | None) -> Any:
    """
    The socket's own transport under C{transport} (through TLS and PROXY
    wrappers), which has the write buffer and reads the socket; or L{None}
    (a test transport).
    """
    # The class is asked, not the instance: Twisted's protocol wrappers
    # (TLS among them) forward unknown attributes to the transport below.
    while transport is not None and not hasattr(type(transport), "bufferSize"):
        transport = getattr(transport, "transport", None)
    return transport


def noDelay(transport: ITransport | None) -> bool:
    """
    Turn Nagle's algorithm off on the TCP socket under C{transport} (through
    TLS and PROXY wrappers): a small frame goes out at once instead of
    waiting for the peer's delayed ACK (about 40 ms on Linux) behind an
    earlier unacknowledged one.

    @return: whether there was a TCP socket to set it on (not for UNIX
        sockets or test transports).
    """
    socket = socketTransport(transport)
    if socket is None or not ITCPTransport.providedBy(socket):
        return False
    socket.setTcpNoDelay(True)
    return True


def closeBounded(protocol: Protocol, clock: IReactorTime, timeout: float) -> IDelayedCall | None:
    """
    Close C{protocol}'s connection after its pending writes, the peer's
    answer not awaited, and abort it if it is still open C{timeout} seconds
    later.

    Over TLS the C{close_notify} alert is queued, and TCP closes once
    everything queued has been written, as plain TCP does.

    @param protocol: a connected protocol; its C{connected} attribute
        becomes false in C{connectionLost} (L{imserver.rpc.RPCProtocol}).
    @param clock: an L{IReactorTime} for the bound.
    @param timeout: seconds before the connection is aborted.
    @return: the L{IDelayedCall} of the abort, to be cancelled in
        C{connectionLost}; or L{None} if the connection was lost at once.
    """
    # TCP, or a wrapper (TLS, PROXY) passing abortConnection on.
    transport = cast(ITCPTransport, protocol.transport)
    transport.loseConnection()
    if not protocol.connected:
        return None
    socket = socketTransport(transport)
    if socket is not None and socket is not transport and not socket.disconnecting:
        # A wrapper (TLS) that waits for its peer: close the socket once the
        # wrapper's last bytes (close_notify) are out instead.
        socket.loseConnection()

    def abort() -> None:
        if protocol.connected:
            transport.abortConnection()

    return clock.callLater(timeout, abort)


class _PassFlusher:
    """
    The connections of one listening port written to in this reactor pass,
    each flushed once, together, at the start of the next pass (one
    C{callLater(0)} per pass for all of them).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.pending: list[BatchedServer] = []
        self.scheduled = False

    def add(self, connection: "BatchedServer") -> None:
        self.pending.append(connection)
        if not self.scheduled:
            self.scheduled = True
            self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        for connection in pending:
            connection.flushPending()


class BatchedServer(tcp.Server):
    """
    An accepted TCP connection whose writes of one reactor pass leave in one
    C{send}, straight from the reactor thread at the end of the pass,
    without the reactor's write machinery when the socket takes them all.

    Twisted's own connection registers for writability at each pass that
    writes (C{epoll_ctl}), waits for the next poll to say the socket is
    writable (it nearly always is), sends, and unregisters (C{epoll_ctl}
    again): two system calls and a poll round trip per connection per pass
    on top of the C{send}.  Here the pass's writes are buffered as Twisted
    buffers them, and flushed by L{_PassFlusher} with the connection's own
    C{doWrite}; only what the socket did not take (a full socket buffer, an
    error, a close in progress) goes the reactor's way, with unchanged
    semantics (flow control, C{loseConnection} after the pending writes,
    errors).
    """

    _flushScheduled = False

    def write(self, data: bytes) -> None:
        if self.TLS:
            # startTLS on this connection (the gate does TLS above it).
            return super().write(data)  # type: ignore[no-any-return]
        if not self.connected or self._writeDisconnected or not data:
            return
        self._tempDataBuffer.append(data)
        self._tempDataLen += len(data)
        self._maybePauseProducer()
        self._scheduleFlush()

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if self.TLS:
            return super().writeSequence(iovec)  # type: ignore[no-any-return]
        if not self.connected or self._writeDisconnected:
            return
        iovec = list(iovec)
        for data in iovec:
            if isinstance(data, str):
                raise TypeError("Data must be bytes, not str")
        self._tempDataBuffer.extend(iovec)
        self._tempDataLen += sum(len(data) for data in iovec)
        self._maybePauseProducer()
        self._scheduleFlush()

    def _scheduleFlush(self) -> None:
        if not self._flushScheduled:
            self._flushScheduled = True
            cast(BatchedPort, self.server).flusher.add(self)

    def flushPending(self) -> None:
        """
        Send what this pass wrote; leave the rest (and any error, or a
        close in progress) to the reactor's write path.
        """
        self._flushScheduled = False
        if not self.connected:
            return
        if self.disconnecting or self._writeDisconnecting:
            # loseConnection registered the connection for writing already:
            # the reactor sends what is left, then closes.
            return
        if self.doWrite() is not None or self.dataBuffer or self._tempDataBuffer:
            # An error (the reactor's next doWrite meets it again and
            # disconnects) or a full socket buffer.
            self.startWriting()


class BatchedPort(tcp.Port):
    """
    A listening TCP port whose connections are L{BatchedServer}s.

    @ivar flusher: the L{_PassFlusher} of its connections.
    """

    transport = BatchedServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # (Also how tcp.Port._fromListeningDescriptor makes one.)
        super().__init__(*args, **kwargs)
        self.flusher = _PassFlusher(cast(IReactorTime, self.reactor))


def batchedListening(reactor: Any) -> Any:
    """
    The reactor endpoints should listen with: a L{BatchedListening} over a
    real (POSIX) reactor; any other reactor (a test's memory reactor)
    itself.
    """
    from twisted.internet.posixbase import PosixReactorBase

    if isinstance(reactor, PosixReactorBase):
        return BatchedListening(reactor)
    return reactor


class BatchedListening:
    """
    A reactor for endpoints to listen with: TCP listeners (C{listenTCP},
    C{adoptStreamPort}) get L{BatchedPort}s; everything else is the
    reactor's own.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        directlyProvides(self, providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> BatchedPort:
        listening = BatchedPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: Any, factory: Any) -> BatchedPort:
        if addressFamily not in (socket.AF_INET, socket.AF_INET6):
            return self._reactor.adoptStreamPort(  # type: ignore[no-any-return]
                fileDescriptor, addressFamily, factory
            )
        listening = cast(
            BatchedPort,
            BatchedPort._fromListeningDescriptor(
                self._reactor, fileDescriptor, addressFamily, factory
            ),
        )
        listening.startListening()
        return listening
