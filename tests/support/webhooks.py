# -*- test-case-name: tests.test_webhooks -*-
"""
A webhook receiver for tests: a real HTTP server (L{twisted.web}) on
127.0.0.1 in the test's process, recording every request, whose answers
the test chooses (a status, hang, answer slowly, close the connection).

The signature of each request is checked here with C{hmac} and
C{hashlib} directly, from the recipe of docs/api.md, independently of
L{imserver.webhooks.signing}.
"""

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.support.live import Changes

#: Answers a test may choose for a request (besides a status code).
OK = "ok"
#: Never answer (the sender's timeout cancels it).
HANG = "hang"
#: Close the connection without answering.
CLOSE = "close"


def slow(seconds, status=200):
    """
    Answer C{status} after C{seconds}.
    """
    return ("slow", seconds, status)


def independentSignature(secret, timestamp, body):
    """
    The signature as docs/api.md says to compute it: C{v1=} and the hex
    HMAC-SHA256 keyed with the secret of C{timestamp + "." + body}.
    """
    mac = hmac.new(secret, timestamp + b"." + body, hashlib.sha256).hexdigest()
    return b"v1=" + mac.encode("ascii")


@dataclass
class Received:
    """
    One request the receiver got.

    @ivar headers: C{{lower-case name: value}} (bytes).
    @ivar event: the parsed JSON body, or L{None} if it was not JSON.
    @ivar answer: what the receiver answered (a status code, L{HANG},
        L{CLOSE}, or the status of a slow answer).
    @ivar signed: whether the signature verified (with the receiver's
        secret, by L{independentSignature}) and the timestamp was within
        five minutes.
    """

    headers: dict
    body: bytes
    event: object
    answer: object
    signed: bool
    at: float = field(default_factory=time.time)

    @property
    def ok(self):
        """
        Whether it was answered 2xx.
        """
        return isinstance(self.answer, int) and 200 <= self.answer < 300


class _Hook(Resource):
    isLeaf = True

    def __init__(self, receiver):
        Resource.__init__(self)
        self.receiver = receiver

    def render_POST(self, request):
        return self.receiver.handle(request)


class _Tracker(WrappingFactory):
    noisy = False

    def __init__(self, site):
        WrappingFactory.__init__(self, site)
        self._gone = []
        self.accepted = 0

    def registerProtocol(self, p):
        WrappingFactory.registerProtocol(self, p)
        self.accepted += 1

    def unregisterProtocol(self, p):
        WrappingFactory.unregisterProtocol(self, p)
        if not self.protocols:
            waiters, self._gone = self._gone, []
            for d in waiters:
                d.callback(None)

    def whenNoConnections(self):
        if not self.protocols:
            return succeed(None)
        d = Deferred()
        self._gone.append(d)
        return d


class WebhookReceiver:
    """
    Receives webhook requests on 127.0.0.1, records them (L{received}) and
    answers as L{behaviour} says.

    @ivar behaviour: called with each L{Received} (its C{answer} not set
        yet); returns L{OK}, a status code, L{HANG}, L{CLOSE} or a
        L{slow} answer.  By default every request is answered 200.
    @ivar changes: a L{Changes} told of every request.
    @ivar port: the port once listening.
    """

    def __init__(self, secret=None, behaviour=None):
        self.secret = secret
        self.behaviour = behaviour or (lambda received: OK)
        self.received = []
        self.changes = Changes()
        self.port = None
        self.tls = False
        self._listening = None
        self._tracker = None
        self._pending = set()

    @property
    def url(self):
        """
        The URL to give the gate.
        """
        return "{}://127.0.0.1:{}/hook".format("https" if self.tls else "http", self.port)

    def start(self, testCase, port=0, certificate=None):
        """
        Listen on 127.0.0.1 (C{port}, default one the OS chooses); stop at
        the cleanup of C{testCase}, closing every connection.

        @param certificate: C{(certificate PEM, key PEM)} to serve HTTPS.
        @return: a L{Deferred} firing with the port.
        """
        self._tracker = _Tracker(Site(_Hook(self)))
        if certificate is None:
            endpoint = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
        else:
            from twisted.internet.endpoints import SSL4ServerEndpoint
            from twisted.internet.ssl import PrivateCertificate

            self.tls = True
            options = PrivateCertificate.loadPEM(certificate[1] + certificate[0]).options()
            endpoint = SSL4ServerEndpoint(reactor, port, options, interface="127.0.0.1")

        def listening(listeningPort):
            self._listening = listeningPort
            self.port = listeningPort.getHost().port
            return self.port

        testCase.addCleanup(self.stop)
        return endpoint.listen(self._tracker).addCallback(listening)

    def stop(self):
        """
        Stop listening and close every connection (answering none of the
        hanging requests).

        @return: a L{Deferred} firing once they are closed.
        """
        for call in list(self._pending):
            if call.active():
                call.cancel()
        self._pending.clear()
        d = succeed(None)
        if self._listening is not None:
            listening, self._listening = self._listening, None
            d = listening.stopListening()
        if self._tracker is None:
            return d

        def closeAll(_):
            for p in list(self._tracker.protocols):
                p.transport.abortConnection()
            return self._tracker.whenNoConnections()

        return d.addCallback(closeAll)

    @property
    def connections(self):
        """
        How many connections were accepted in all.
        """
        return self._tracker.accepted if self._tracker is not None else 0

    def handle(self, request):
        headers = {
            name.lower(): values[0] for name, values in request.requestHeaders.getAllRawHeaders()
        }
        body = request.content.read()
        try:
            event = json.loads(body)
        except ValueError:
            event = None
        signed = False
        if self.secret is not None:
            timestamp = headers.get(b"x-im-timestamp", b"")
            expected = independentSignature(self.secret, timestamp, body)
            signed = (
                timestamp.isdigit()
                and abs(time.time() - int(timestamp)) <= 300
                and hmac.compare_digest(expected, headers.get(b"x-im-signature", b""))
            )
        received = Received(headers, body, event, None, signed)
        action = self.behaviour(received)
        if action == OK:
            action = 200
        if isinstance(action, int):
            received.answer = action
            self._record(received)
            request.setResponseCode(action)
            return b""
        if action == HANG:
            received.answer = HANG
            self._record(received)
            return NOT_DONE_YET
        if action == CLOSE:
            received.answer = CLOSE
            self._record(received)
            request.channel.transport.abortConnection()
            return NOT_DONE_YET
        _, seconds, status = action

        def answer():
            self._pending.discard(call)
            received.answer = status
            self._record(received)
            if not request.finished and request.channel is not None:
                request.setResponseCode(status)
                request.finish()

        call = reactor.callLater(seconds, answer)
        self._pending.add(call)
        return NOT_DONE_YET

    def _record(self, received):
        self.received.append(received)
        self.changes.changed()

    def delivered(self):
        """
        The events of the requests answered 2xx, in the order they came.
        """
        return [r.event for r in self.received if r.ok]

    def firstReceipts(self):
        """
        The events answered 2xx, each id once (its first), in order.
        """
        seen = set()
        events = []
        for event in self.delivered():
            if event["id"] not in seen:
                seen.add(event["id"])
                events.append(event)
        return events

    def until(self, predicate, timeout, what=None):
        """
        @return: a L{Deferred} firing once C{predicate()} holds (checked now
            and after every request), failing after C{timeout} seconds.
        """
        return self.changes.until(predicate, timeout, what)
