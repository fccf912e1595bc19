# -*- test-case-name: tests.test_limits -*-
"""
Limits against abuse, before and after a connection is accepted.

  - L{TokenBucket}: the rate limiter used for accepts, requests and failed
    auths.
  - L{AdmissionFactory}: wraps a gate listener's factory, outside TLS, and
    refuses a new connection (the socket is closed at once, before any TLS
    work) when the process holds C{max_connections}, when its peer address
    holds C{max_connections_per_ip}, or when accepts come faster than
    C{accept_rate}.
  - L{FailedAuthThrottle}: failed authentications per peer address and per
    uid.

The counts are the gate's live connections (L{imserver.protocol.GateFactory}
keeps them in C{connectionMade}/C{connectionLost}), so they cannot drift.
"""

from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from zope.interface import implementer


class TokenBucket:
    """
    C{rate} tokens per second, at most C{burst} saved up; starts full.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "_seconds")

    def __init__(self, rate, burst, clock):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._seconds = clock.seconds
        self.stamp = self._seconds()

    def level(self):
        """
        @return: the tokens there are now.
        """
        now = self._seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens

    def take(self, cost=1.0):
        """
        Take C{cost} tokens if there are that many.

        @return: whether they were taken.
        """
        if self.level() < cost:
            return False
        self.tokens -= cost
        return True


def peerHost(address):
    """
    The host part of a peer address (C{IPv4Address}, C{IPv6Address}, ...),
    or L{None} for addresses without one (UNIX sockets).
    """
    return getattr(address, "host", None)


@implementer(IProtocolFactory)
class AdmissionFactory:
    """
    Decides, for each accepted socket, whether the gate takes it, before
    C{wrapped} (the gate factory, or TLS around it) builds anything.

    @param gate: the L{imserver.protocol.GateFactory} whose connections are
        counted.
    @param wrapped: the factory the listener would otherwise use.
    @param perPeer: whether the peer address is the client's (L{False}
        behind a PROXY-protocol wrapper, where it is the proxy's, so the
        per-address limit cannot apply here).
    """

    log = Logger()
    noisy = False

    def __init__(self, gate, wrapped, perPeer=True):
        self.gate = gate
        self.wrapped = wrapped
        self.perPeer = perPeer

    def doStart(self):
        self.wrapped.doStart()

    def doStop(self):
        self.wrapped.doStop()

    def logPrefix(self):
        return "admission"

    def buildProtocol(self, addr):
        reason = self.gate.refusal(peerHost(addr) if self.perPeer else None)
        if reason is not None:
            self.gate.metrics.connectionsRefused[reason] += 1
            self.log.debug("refused a connection from {peer}: {reason}", peer=addr, reason=reason)
            return None
        return self.wrapped.buildProtocol(addr)


class FailedAuthThrottle:
    """
    Counts failed authentications per peer address and per uid, each in a
    token bucket: once one is empty, further auths from that address or
    for that uid are refused without checking the token until it refills.

    @param rate: failures per second allowed in the long run.
    @param burst: failures allowed at once.
    """

    #: Buckets kept before the full ones are forgotten.
    MAX_TRACKED = 100_000

    def __init__(self, rate, burst, clock):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets = {}

    def allowed(self, host, uid):
        """
        Whether an auth from C{host} for C{uid} may be checked now.
        """
        return all(self._hasTokens(key) for key in (("ip", host), ("uid", uid)))

    def failed(self, host, uid):
        """
        Record a failed auth.
        """
        if len(self._buckets) >= self.MAX_TRACKED:
            self._forgetFull()
        for key in (("ip", host), ("uid", uid)):
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.clock)
            bucket.take()

    def _hasTokens(self, key):
        bucket = self._buckets.get(key)
        return bucket is None or bucket.level() >= 1.0

    def _forgetFull(self):
        for key, bucket in list(self._buckets.items()):
            if bucket.level() >= bucket.burst:
                del self._buckets[key]
        if len(self._buckets) >= self.MAX_TRACKED:
            # Nothing to forget: an attack from everywhere.  Bounded memory
            # matters more than remembering every address.
            self._buckets.clear()
