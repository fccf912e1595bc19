# -*- test-case-name: tests.test_beforesend -*-
"""
The before-send check (C{--before-send URL}): before a client's C{send} is
stored, the gate asks the app backend, with one HTTP POST, whether to store
it as is, refuse it, or store another body instead.  Off by default.

The contract (docs/api.md, "Before-send check"): the gate POSTs
L{requestBody}'s JSON; a C{200} answer whose JSON object has C{"result"}
C{"allow"}, C{"reject"} (with an optional C{"message"}) or C{"replace"}
(with C{"body"}, base64, and an optional C{"content_type"}) decides
(L{parseAnswer}).  Anything else (no answer within C{before_send_timeout},
a connection error, a status other than 200, a malformed answer) is a
failure of the check, and C{--before-send-failure} says what then: refuse
the send with C{UNAVAILABLE} (C{closed}, the default) or store it unchecked
(C{open}).

  - L{BeforeSendCheck} asks: at most C{before_send_concurrency} requests in
    flight (one persistent HTTP connection each), at most
    C{before_send_queue} sends waiting for a slot (first come, first
    served); a send beyond both is refused C{RATE_LIMITED}, whatever the
    failure policy, so a flood never passes unchecked.
  - L{SendOrder} keeps the order of one connection's sends: each is handed
    to the store once its own check and every check of the sends received
    before it on the connection have answered, so sends pipelined on one
    connection are stored in the order received, as without the check.
  - L{imserver.messaging.Messenger.send} applies the verdict.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from imserver import __version__
from imserver.errors import BadRequest, RateLimited, Unavailable
from imserver.httpclient import BytesBody, checkURL, trustRootFor
from imserver.identifiers import validateContentType

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime
    from twisted.web.iweb import IAgent, IResponse

    from imserver.pb import im_pb2 as pb
    from imserver.settings import Settings

_T = TypeVar("_T")

ALLOW = "allow"
REJECT = "reject"
REPLACE = "replace"
#: The C{result}s of an answer.
RESULTS = (ALLOW, REJECT, REPLACE)
#: How a check ended (label values of C{imserver_before_send_checks_total}):
#: the three answers, no answer within the timeout, any other failure
#: (connection, status, malformed answer), and no room in the queue.
OUTCOMES = RESULTS + ("timeout", "error", "queue_full")

#: C{--before-send-failure} values.
FAIL_CLOSED = "closed"
FAIL_OPEN = "open"

#: Longest C{message} of a rejection passed on to the client, in UTF-8
#: bytes (a longer one is cut at a character boundary).
MAX_REJECT_MESSAGE = 256
#: The client's error message when the backend gave none.
DEFAULT_REJECT_MESSAGE = "refused by the before-send check"
#: Bytes of an answer read beyond what a replaced body of
#: C{max_message_body} bytes takes in base64: a longer answer is a failure.
ANSWER_SLACK = 16 * 1024
#: Seconds between two warnings about failing checks (the failures in
#: between are counted in the next one, and in the metrics).
WARN_INTERVAL = 10.0

_RETRIED = (ResponseNeverReceived, RequestNotSent, RequestTransmissionFailed)


class CheckFailed(Exception):
    """
    The check gave no usable answer: a status other than 200, a malformed
    answer, or an answer too long.
    """


@dataclass(frozen=True)
class Verdict:
    """
    What to do with a send.

    @ivar result: L{ALLOW}, L{REJECT} or L{REPLACE}.
    @ivar message: for L{REJECT}: the client's error message.
    @ivar body: for L{REPLACE}: the body to store.
    @ivar contentType: for L{REPLACE}: the content type to store, or
        L{None} to keep the client's.
    @ivar checked: L{False} for a send let through unchecked because the
        check failed (C{--before-send-failure open}).
    """

    result: str
    message: str = ""
    body: bytes = b""
    contentType: str | None = None
    checked: bool = True


#: The verdict of a failed check under C{--before-send-failure open}.
UNCHECKED = Verdict(ALLOW, checked=False)


def requestBody(sender: str, deviceId: str, request: pb.SendRequest) -> bytes:
    """
    The JSON the gate posts for a C{send}: C{sender} (the authenticated
    uid), C{device_id}, C{to} (1:1) or C{group_id} (group), C{client_msg_id},
    C{body} (standard base64, padded) and C{content_type}.
    """
    value: dict[str, str] = {"sender": sender, "device_id": deviceId}
    if request.group_id:
        value["group_id"] = request.group_id
    else:
        value["to"] = request.to
    value["client_msg_id"] = request.client_msg_id
    value["body"] = base64.b64encode(request.body).decode("ascii")
    value["content_type"] = request.content_type
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def parseAnswer(data: bytes, maxBody: int) -> Verdict:
    """
    The verdict of a C{200} answer's body.  Members other than those of its
    C{result} are ignored.

    @param maxBody: the largest replaced body accepted (C{max_message_body}).
    @raise CheckFailed: if it is not one of the documented answers, or
        replaces the body with one the client could not have sent (longer
        than C{maxBody}, or a C{content_type} longer than 64 bytes).
    """
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CheckFailed("the answer is not JSON: {}".format(e)) from None
    if not isinstance(answer, dict):
        raise CheckFailed("the answer is not a JSON object")
    result = answer.get("result")
    if result == ALLOW:
        return Verdict(ALLOW)
    if result == REJECT:
        message = answer.get("message", "")
        if not isinstance(message, str):
            raise CheckFailed("the message of a reject is not a string")
        return Verdict(REJECT, message=boundMessage(message) or DEFAULT_REJECT_MESSAGE)
    if result == REPLACE:
        return _replacement(answer, maxBody)
    raise CheckFailed(
        "the result is {}, not allow, reject or replace".format(
            json.dumps(result)[:64] if result is not None else "missing"
        )
    )


def _replacement(answer: dict[str, Any], maxBody: int) -> Verdict:
    encoded = answer.get("body")
    if not isinstance(encoded, str):
        raise CheckFailed("a replace has no body string")
    try:
        body = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise CheckFailed("the body of a replace is not base64") from None
    if len(body) > maxBody:
        raise CheckFailed(
            "the replaced body of {} bytes exceeds max_message_body {}".format(len(body), maxBody)
        )
    contentType = answer.get("content_type")
    if contentType is not None:
        if not isinstance(contentType, str):
            raise CheckFailed("the content_type of a replace is not a string")
        try:
            validateContentType(contentType)
        except BadRequest as e:
            raise CheckFailed("the content_type of a replace: {}".format(e.message)) from None
    return Verdict(REPLACE, body=body, contentType=contentType)


def boundMessage(text: str) -> str:
    """
    C{text} cut to at most L{MAX_REJECT_MESSAGE} bytes of UTF-8, at a
    character boundary (lone surrogates, which UTF-8 cannot hold, become
    U+FFFD).
    """
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= MAX_REJECT_MESSAGE:
        return encoded.decode("utf-8")
    return encoded[:MAX_REJECT_MESSAGE].decode("utf-8", "ignore")


class _BoundedBody(Protocol):
    """
    Reads a response body of at most C{limit} bytes into C{finished}; a
    longer one fails it and closes the connection.
    """

    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.received: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.abort()
            self.finished.errback(
                CheckFailed("the answer is longer than {} bytes".format(self.limit))
            )
            return
        self.received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.received))
        else:
            self.finished.errback(reason)

    def abort(self) -> None:
        """
        Close the connection the body comes on (it is not reused).
        """
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


class _Refuse(Protocol):
    """
    Takes a response body it will not read: closes its connection.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def readBounded(response: IResponse, limit: int) -> Deferred[bytes]:
    """
    The body of C{response}, if it is at most C{limit} bytes; cancelling
    closes the connection.

    @return: a L{Deferred} firing with the body, or failing with
        L{CheckFailed} if it is longer (the connection is then closed).
    """
    length = response.length
    if isinstance(length, int) and length > limit:
        response.deliverBody(_Refuse())
        return fail(CheckFailed("the answer is longer than {} bytes".format(limit)))
    protocol: _BoundedBody

    def cancel(d: Deferred[bytes]) -> None:
        protocol.abort()

    finished: Deferred[bytes] = Deferred(cancel)
    protocol = _BoundedBody(finished, limit)
    response.deliverBody(protocol)
    return finished


class _Pending:
    """
    One send's check: queued, then in flight, until it has its verdict.
    """

    __slots__ = ("payload", "result", "started", "timer", "request", "done")

    def __init__(self, payload: bytes, started: float) -> None:
        self.payload = payload
        self.result: Deferred[Verdict] = Deferred()
        self.started = started
        self.timer: IDelayedCall | None = None
        self.request: Deferred[Verdict] | None = None
        #: Whether C{result} has fired (the request may still be under way).
        self.done = False


class BeforeSendCheck:
    """
    Asks the app backend about each send (the module docstring says how).

    @ivar queued: the sends waiting for a request slot, first come first.
    """

    log = Logger()

    def __init__(
        self,
        url: bytes,
        agent: IAgent,
        clock: IReactorTime,
        settings: Settings,
        metrics: Any,
        failOpen: bool = False,
    ) -> None:
        """
        @param url: the C{http://} or C{https://} URL (L{checkURL}).
        @param agent: what posts: an L{Agent} on a persistent
            L{HTTPConnectionPool} (L{makeAgent}).
        @param settings: its C{before_send_timeout},
            C{before_send_concurrency}, C{before_send_queue} and
            C{max_message_body} apply.
        @param metrics: the L{imserver.metrics.GateMetrics}: the checks are
            counted by outcome (C{beforeSendChecks}) and timed
            (C{beforeSendSeconds}).
        @param failOpen: when a check fails, store the send unchecked
            instead of refusing it C{UNAVAILABLE}.
        """
        self.url = url
        self.agent = agent
        self.clock = clock
        self.timeout = settings.before_send_timeout
        self.concurrency = settings.before_send_concurrency
        self.queueLimit = settings.before_send_queue
        self.maxBody = settings.max_message_body
        self.answerLimit = 4 * ((settings.max_message_body + 2) // 3) + ANSWER_SLACK
        self.failOpen = failOpen
        self.metrics = metrics
        self.queued: collections.deque[_Pending] = collections.deque()
        self._active: set[_Pending] = set()
        self._headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"User-Agent": ["imserver/{}".format(__version__).encode("ascii")],
            }
        )
        self._stopped = False
        self._unwarned = 0
        self._lastWarning = float("-inf")

    @property
    def inFlight(self) -> int:
        """
        Requests under way.
        """
        return len(self._active)

    @property
    def pending(self) -> int:
        """
        Sends waiting for their verdict: in flight and queued.
        """
        return len(self._active) + len(self.queued)

    def check(self, sender: str, deviceId: str, request: pb.SendRequest) -> Deferred[Verdict]:
        """
        Ask about one C{send} of C{sender} from its device C{deviceId}.

        @return: a L{Deferred} firing with a L{Verdict} within
            C{before_send_timeout} (L{UNCHECKED} for a failed check under
            C{--before-send-failure open}), or failing with
            L{Unavailable} (a failed check under C{closed}; the gate is
            stopping) or L{RateLimited} (no room in the queue).
        """
        if self._stopped:
            return fail(Unavailable("the gate is stopping"))
        if len(self._active) >= self.concurrency and len(self.queued) >= self.queueLimit:
            self.metrics.beforeSendChecks["queue_full"] += 1
            self.metrics.rateLimited += 1
            return fail(RateLimited("too many sends waiting for the before-send check"))
        pending = _Pending(requestBody(sender, deviceId, request), self.clock.seconds())
        pending.timer = self.clock.callLater(self.timeout, self._timedOut, pending)
        if len(self._active) < self.concurrency:
            self._start(pending)
        else:
            self.queued.append(pending)
        return pending.result

    def _start(self, pending: _Pending) -> None:
        self._active.add(pending)
        pending.request = d = self._post(pending, retry=True)
        d.addBoth(self._answered, pending)

    def _post(self, pending: _Pending, retry: bool) -> Deferred[Verdict]:
        d = self.agent.request(
            b"POST", self.url, self._headers, BytesBody(pending.payload)
        ).addCallback(self._response)

        def again(failure: Failure) -> Deferred[Verdict]:
            # A persistent connection the backend closed just as the request
            # went out on it: once more, on another connection.
            if retry and not pending.done and failure.check(*_RETRIED):
                return self._post(pending, retry=False)
            return fail(failure)

        return d.addErrback(again)

    def _response(self, response: IResponse) -> Deferred[Verdict]:
        # Read (bounded) even when refused: the connection is then reused.
        d = readBounded(response, self.answerLimit)
        if response.code != 200:

            def refused(_: bytes) -> Verdict:
                raise CheckFailed("HTTP status {}".format(response.code))

            return d.addCallback(refused)
        return d.addCallback(parseAnswer, self.maxBody)

    def _answered(self, outcome: Verdict | Failure, pending: _Pending) -> None:
        self._active.discard(pending)
        if not pending.done:
            if isinstance(outcome, Verdict):
                self._finish(pending, outcome.result)
                pending.result.callback(outcome)
            else:
                self._failed(pending, outcome, "error")
        queued = self.queued
        while queued and len(self._active) < self.concurrency and not self._stopped:
            self._start(queued.popleft())

    def _timedOut(self, pending: _Pending) -> None:
        pending.timer = None
        reason = Failure(CheckFailed("no answer within {} s".format(self.timeout)))
        if pending.request is None:
            self.queued.remove(pending)
            self._failed(pending, reason, "timeout")
        else:
            # Failed first: the cancelled request's own failure is ignored.
            self._failed(pending, reason, "timeout")
            pending.request.cancel()

    def _failed(self, pending: _Pending, reason: Failure, outcome: str) -> None:
        self._finish(pending, outcome)
        self._warn(reason)
        if self.failOpen:
            pending.result.callback(UNCHECKED)
        else:
            pending.result.errback(Unavailable("the before-send check is unavailable; retry later"))

    def _finish(self, pending: _Pending, outcome: str) -> None:
        pending.done = True
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        self.metrics.beforeSendChecks[outcome] += 1
        self.metrics.beforeSendSeconds.observe(self.clock.seconds() - pending.started)

    def _warn(self, reason: Failure) -> None:
        """
        Log a failed check: at most one warning per L{WARN_INTERVAL}, which
        counts the failures since the previous one.
        """
        now = self.clock.seconds()
        if now - self._lastWarning < WARN_INTERVAL:
            self._unwarned += 1
            return
        self.log.warn(
            "before-send check failed: {why} ({others} other failures since the last "
            "warning); such sends are {policy}",
            why=_describe(reason),
            others=self._unwarned,
            policy="stored unchecked" if self.failOpen else "refused UNAVAILABLE",
        )
        self._lastWarning = now
        self._unwarned = 0

    def stop(self) -> None:
        """
        The gate is stopping: refuse the sends waiting for a verdict and
        those that come later C{UNAVAILABLE} (never unchecked, whatever the
        failure policy), and cancel the requests under way.
        """
        self._stopped = True
        queued, self.queued = self.queued, collections.deque()
        for pending in list(queued) + list(self._active):
            if not pending.done:
                pending.done = True
                if pending.timer is not None:
                    pending.timer.cancel()
                    pending.timer = None
                pending.result.errback(Unavailable("the gate is stopping"))
        for pending in list(self._active):
            pending.request.cancel()  # type: ignore[union-attr]


def _describe(reason: Failure) -> str:
    """
    Why a check failed, in a few words (the reasons inside Twisted's
    wrapped HTTP client errors included).
    """
    value = reason.value
    if isinstance(value, _RETRIED):
        inner = "; ".join(f.getErrorMessage() for f in getattr(value, "reasons", ()))
        return "{} ({})".format(type(value).__name__, inner)
    if isinstance(value, CheckFailed):
        return str(value)
    return "{}: {}".format(type(value).__name__, reason.getErrorMessage())


class _Turn:
    """
    A send's place in its connection's L{SendOrder}.
    """

    __slots__ = ("proceed", "args", "result", "outcome", "ready")

    def __init__(self, proceed: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.proceed = proceed
        self.args = args
        self.result: Deferred[Any] = Deferred()
        self.outcome: Any = None
        self.ready = False


class SendOrder:
    """
    The sends of one connection, handed on in the order they were received,
    each once its check has answered: a check that answers early waits for
    those of the sends before it.  Checks still run concurrently.
    """

    __slots__ = ("_turns",)

    def __init__(self) -> None:
        self._turns: collections.deque[_Turn] = collections.deque()

    def __len__(self) -> int:
        return len(self._turns)

    def add(self, checked: Deferred[_T], proceed: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Queue a send behind the ones already here.

        @param checked: its check: a L{Deferred} firing with a verdict or
            failing.
        @param proceed: called, in order, as C{proceed(verdict or Failure,
            *args)}: what it returns or raises is the send's outcome.
        @return: a L{Deferred} firing with that outcome.
        """
        turn = _Turn(proceed, args)
        self._turns.append(turn)
        checked.addBoth(self._ready, turn)
        return turn.result

    def _ready(self, outcome: object, turn: _Turn) -> None:
        turn.outcome = outcome
        turn.ready = True
        turns = self._turns
        while turns and turns[0].ready:
            first = turns.popleft()
            maybeDeferred(first.proceed, first.outcome, *first.args).chainDeferred(first.result)


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


def makeAgent(
    reactor: Any, settings: Settings, caFile: str | None = None
) -> tuple[Agent, HTTPConnectionPool]:
    """
    The agent the check posts with: persistent connections (up to
    C{before_send_concurrency}, each kept until the backend closes it or
    for 4 minutes idle), C{https} verified against the platform's trust
    store, or against C{caFile} if given.

    @param caFile: a PEM file of the CA (or self-signed certificate) that
        signs the backend's certificate.
    @raise OSError: if C{caFile} cannot be read.
    @raise ValueError: if it holds no PEM certificate.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = settings.before_send_concurrency
    # No "Starting factory" log line per connection.
    pool._factory = _QuietClientFactory
    # POSTs are never retried by the pool; the check retries once itself.
    pool.retryAutomatically = False
    trustRoot = None
    if caFile is not None:
        trustRoot = trustRootFor(caFile)
    agent = Agent(
        reactor,
        contextFactory=BrowserLikePolicyForHTTPS(trustRoot),
        connectTimeout=settings.before_send_timeout,
        pool=pool,
    )
    return agent, pool


def checkOptions(options: Any) -> None:
    """
    Check C{--before-send}, C{--before-send-failure} and
    C{--before-send-ca} of C{twistd im}'s options; sets
    C{options.beforeSendURL} (bytes, or L{None} when off).

    @raise usage.UsageError: naming the option, if one is wrong.
    """
    from twisted.python import usage

    url = options["before-send"]
    failure = options["before-send-failure"]
    if failure not in (FAIL_CLOSED, FAIL_OPEN):
        raise usage.UsageError(
            "--before-send-failure {}: give closed (refuse the send UNAVAILABLE) or open "
            "(store it unchecked)".format(failure)
        )
    options.beforeSendURL = None
    if url is None or url.lower() == "none":
        if options["before-send-ca"] is not None:
            raise usage.UsageError("--before-send-ca goes with an https:// --before-send")
        return
    try:
        options.beforeSendURL = checkURL(url)
    except ValueError as e:
        raise usage.UsageError(
            "--before-send {}: {}; give http://HOST[:PORT]/PATH or https://...".format(url, e)
        )
    caFile = options["before-send-ca"]
    if caFile is not None:
        if not url.lower().startswith("https:"):
            raise usage.UsageError("--before-send-ca goes with an https:// --before-send")
        try:
            trustRootFor(caFile)
        except (OSError, ValueError) as e:
            raise usage.UsageError(
                "--before-send-ca {}: {}; give the PEM file of the CA (or self-signed "
                "certificate) that signs the backend's certificate".format(caFile, e)
            )


class BeforeSendService(Service):
    """
    Stops the check with the gate: refuses what waits for it and closes its
    connections.
    """

    def __init__(self, check: BeforeSendCheck, pool: HTTPConnectionPool) -> None:
        self.check = check
        self.pool = pool

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self.check.stop()
        return self.pool.closeCachedConnections()  # type: ignore[no-any-return]


def fromOptions(
    options: Any, reactor: Any, settings: Settings, metrics: Any
) -> tuple[BeforeSendCheck | None, BeforeSendService | None]:
    """
    The check C{twistd im}'s options ask for (L{checkOptions} checked
    them), and the service that stops it.

    @return: C{(check, service)}, or C{(None, None)} without C{--before-send}.
    """
    url = getattr(options, "beforeSendURL", None)
    if url is None:
        return None, None
    agent, pool = makeAgent(reactor, settings, options["before-send-ca"])
    check = BeforeSendCheck(
        url,
        agent,
        reactor,
        settings,
        metrics,
        failOpen=options["before-send-failure"] == FAIL_OPEN,
    )
    metrics.watchBeforeSend(check)
    service = BeforeSendService(check, pool)
    service.setName("before-send")
    return check, service
