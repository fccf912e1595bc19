# -*- test-case-name: tests.test_webhooks -*-
"""
The HTTP side of the webhook sender: one signed C{POST} per event, with
L{twisted.web.client.Agent} over a persistent connection pool, through the
injected reactor.

An C{https://} URL is verified like a browser does
(L{twisted.web.client.BrowserLikePolicyForHTTPS}): against the platform's
trust store, or C{--webhook-ca}.  Every request is bounded by
C{webhook_timeout} (connecting, sending, the answer and its body): then it
is cancelled, which closes its connection.  The answer's body is read and
thrown away, so the connection can be reused.
"""

from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers

from imserver import __version__
from imserver.httpclient import BytesBody
from imserver.webhooks.events import OutboxEntry, envelope
from imserver.webhooks.sender import Answer
from imserver.webhooks.signing import sign

#: The C{User-Agent} of webhook requests.
USER_AGENT = "imserver/{} webhooks".format(__version__).encode("ascii")
#: The most a C{Retry-After} is believed, in seconds (the sender also caps
#: it at C{webhook_retry_max}).
MAX_RETRY_AFTER = 86400.0


class _Discard(Protocol):
    """
    Reads an answer's body and throws it away.
    """

    def __init__(self, finished: "Deferred[None]") -> None:
        self.finished = finished

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.finished.called:
            self.finished.callback(None)


def _retryAfter(headers: Headers) -> float | None:
    values = headers.getRawHeaders(b"retry-after")
    if not values:
        return None
    value = values[0].strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    return None  # an HTTP date: not believed


class HTTPPoster:
    """
    Posts webhook events to one URL.

    @ivar pool: the persistent L{HTTPConnectionPool}.
    """

    def __init__(
        self,
        reactor: Any,
        url: bytes,
        secret: bytes,
        timeout: float,
        connections: int,
        trustRoot: Any = None,
    ) -> None:
        """
        @param url: the C{--webhook} URL (L{checkURL}).
        @param secret: the webhook secret.
        @param timeout: seconds an attempt may take in all.
        @param connections: persistent connections kept (the sender's
            concurrency).
        @param trustRoot: for C{https://}: the trust root (L{trustRootFor});
            L{None} for the platform's.
        """
        self.clock = reactor
        self.url = url
        self._secret = secret
        self.timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = connections
        self.pool.retryAutomatically = False
        policy = BrowserLikePolicyForHTTPS(trustRoot=trustRoot)
        self.agent = Agent(reactor, policy, connectTimeout=timeout, pool=self.pool)

    def __repr__(self) -> str:
        return "<HTTPPoster {}>".format(self.url.decode("ascii"))

    def headers(self, entry: OutboxEntry, body: bytes, timestamp: int) -> Headers:
        """
        The headers of one attempt at C{entry}.
        """
        return Headers(
            {
                b"Content-Type": [b"application/json"],
                b"User-Agent": [USER_AGENT],
                b"X-IM-Event-Id": [entry.eventId.encode("utf-8")],
                b"X-IM-Event-Type": [entry.type.encode("utf-8")],
                b"X-IM-Timestamp": [str(timestamp).encode("ascii")],
                b"X-IM-Signature": [sign(self._secret, timestamp, body).encode("ascii")],
            }
        )

    def post(self, entry: OutboxEntry) -> "Deferred[Answer]":
        """
        Send C{entry}, signed now.

        @return: a L{Deferred} firing with the L{Answer} once its body is
            read, or failing (L{twisted.internet.defer.TimeoutError} after
            the timeout, a connection error); cancelling it abandons the
            request and closes its connection.
        """
        body = envelope(entry)
        timestamp = int(self.clock.seconds())
        d = self.agent.request(
            b"POST", self.url, self.headers(entry, body, timestamp), BytesBody(body)
        )
        answered: Deferred[Answer] = d.addCallback(self._answered)
        # Not Deferred.addTimeout: the agent turns the cancellation into a
        # ResponseNeverReceived, which it would not recognise.
        timedOut = []

        def expire() -> None:
            timedOut.append(True)
            answered.cancel()

        timer = self.clock.callLater(self.timeout, expire)

        def done(result: object) -> object:
            if timer.active():
                timer.cancel()
            if timedOut and isinstance(result, Failure):
                raise TimeoutError(
                    "no answer from the webhook receiver within {} s".format(self.timeout)
                )
            return result

        return answered.addBoth(done)

    def _answered(self, response: Any) -> "Deferred[Answer]":
        answer = Answer(response.code, _retryAfter(response.headers))

        def cancel(d: "Deferred[None]") -> None:
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.stopProducing()

        finished: Deferred[None] = Deferred(cancel)
        protocol = _Discard(finished)
        response.deliverBody(protocol)
        return finished.addCallback(lambda _: answer)

    def close(self) -> "Deferred[None]":
        """
        Close the idle persistent connections.
        """
        return self.pool.closeCachedConnections()
