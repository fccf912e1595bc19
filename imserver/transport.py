# -*- test-case-name: tests.test_closing -*-
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

from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport, ITransport
from twisted.internet.protocol import Protocol


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
