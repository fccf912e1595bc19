# -*- test-case-name: tests.test_webhooks -*-
"""
Presence events: C{user.online} when a session is registered,
C{user.offline} when it ends, written to the outbox
(L{imserver.interfaces.IOutbox.enqueue}) off the gate's delivery path.

L{PresenceRegistry} wraps the gate's session registry (the gate's sessions
register and unregister through it) and tells the L{PresenceNotifier}.
Nothing of this exists without C{--webhook}, or when C{--webhook-events}
names neither presence event.

Flapping is coalesced per device (uid and device id) of this gate: an
offline is held for C{presence_flap_window} seconds; if the device comes
back on this gate meanwhile, neither the offline nor the new online is
reported, and the device stays reported under the session id of its
first online (the offline that eventually ends it names that session).
A device replaced by a new login of the same device on this gate is the
same case.

The outbox also keeps a ledger of the devices reported online and not
offline (the C{presence} of the events).  A gate that stops without
reporting its offlines (C{kill -9}) reports them when it starts again,
with the reason C{gate_restarted}: in embedded mode (one gate per data
directory) the ledger is kept under L{EMBEDDED_LEDGER}, whatever the gate
id of each run; in cluster mode under the gate id, which must then be the
same across restarts (C{--gate-id}).  At a clean stop the held offlines
are written before the store closes.
"""

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imserver.errors import Unavailable
from imserver.interfaces import ISessionRegistry
from imserver.webhooks.events import (
    USER_OFFLINE,
    USER_ONLINE,
    OutboxEvent,
    userOffline,
    userOnline,
)

#: C{user.offline} reasons.
CLOSED = "closed"
KICKED = "kicked"
GATE_RESTARTED = "gate_restarted"

#: The presence ledger's gate in embedded mode (one gate per outbox): not
#: a valid gate id, so never one of a cluster's.
EMBEDDED_LEDGER = ""
#: Seconds before writing presence events again after the store refused.
RETRY_DELAY = 1.0
#: The most presence events waiting in memory while the store refuses
#: them; more are dropped (counted as C{full}).
MAX_WAITING = 100_000


def gateOfSession(sessionId: str) -> str:
    """
    The gate id of a session id (C{<gate id>/<connection number>}).
    """
    return sessionId.rpartition("/")[0]


@dataclasses.dataclass
class _Device:
    """
    A device of this gate reported online.

    @ivar sessionId: the session id it was reported online with.
    @ivar session: its live session, or L{None} while its offline is held.
    @ivar held: the L{IDelayedCall} writing the held offline.
    @ivar reason: the held offline's reason.
    """

    sessionId: str
    session: Any
    held: Any = None
    reason: str = CLOSED


class PresenceNotifier:
    """
    Turns this gate's session registrations into presence events.

    @ivar devices: C{{(uid, device id): _Device}} reported online by this
        gate.
    """

    log = Logger()

    def __init__(
        self,
        outbox: Any,
        clock: Any,
        gateId: str,
        flapWindow: float,
        metrics: Any,
        eventTypes: Iterable[str] = (USER_ONLINE, USER_OFFLINE),
        ledger: str | None = None,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        """
        @param outbox: the L{imserver.interfaces.IOutbox}.
        @param gateId: this gate's id (in the events).
        @param flapWindow: seconds an offline is held (0: none is).
        @param metrics: the L{imserver.webhooks.metrics.WebhookMetrics}.
        @param eventTypes: the presence event types to report.
        @param ledger: the gate the outbox's presence ledger keeps this
            gate's devices under: L{EMBEDDED_LEDGER}, or (default) the gate
            id.
        @param wake: called when events were written (the sender's
            L{imserver.webhooks.sender.WebhookSender.wake}).
        """
        self.outbox = outbox
        self.clock = clock
        self.gateId = gateId
        self.flapWindow = flapWindow
        self.metrics = metrics
        self.eventTypes = frozenset(eventTypes)
        self.ledger = gateId if ledger is None else ledger
        # The ledger needs both: an online adds a device, its offline
        # removes it (else it would only grow).
        self.keepsLedger = {USER_ONLINE, USER_OFFLINE} <= self.eventTypes
        self.wake = wake
        self.devices: dict[tuple[str, str], _Device] = {}
        self.started = False
        self.stopped = False
        # Events not written yet: until the start's recovery is done, or
        # while the store refuses them.
        self._waiting: list[OutboxEvent] = []
        self._blocked = True
        self._retryCall: Any = None
        self._writes: set[Deferred[Any]] = set()

    def __repr__(self) -> str:
        return "<PresenceNotifier {} devices={}>".format(self.gateId, len(self.devices))

    # -- the registry's side ----------------------------------------------------

    def online(self, session: Any) -> None:
        """
        C{session} was registered.
        """
        if self.stopped:
            return
        key = (session.uid, session.deviceId)
        device = self.devices.get(key)
        if device is None:
            self.devices[key] = _Device(session.sessionId, session)
            self._emit(
                USER_ONLINE,
                userOnline(
                    session.uid, session.deviceId, session.platform, self.gateId, session.sessionId
                ),
            )
            return
        if device.held is not None:
            # Back within the window: neither event is reported.
            device.held.cancel()
            device.held = None
            device.session = session
            self.metrics.coalesced += 1
            return
        if device.session is session:
            return
        # The same device signed in again on this gate, replacing its
        # session: a flap too, unless there is no window.
        if self.flapWindow > 0:
            device.session = session
            self.metrics.coalesced += 1
            return
        self._emit(USER_OFFLINE, self._offline(key, device.sessionId, KICKED))
        self.devices[key] = _Device(session.sessionId, session)
        self._emit(
            USER_ONLINE,
            userOnline(
                session.uid, session.deviceId, session.platform, self.gateId, session.sessionId
            ),
        )

    def offline(self, session: Any, reason: str = CLOSED) -> None:
        """
        C{session} ended (its connection closed, or it was kicked).
        """
        if self.stopped:
            return
        key = (session.uid, session.deviceId)
        device = self.devices.get(key)
        if device is None or device.session is not session:
            return  # replaced already, or never reported
        device.session = None
        device.reason = reason
        if self.flapWindow > 0:
            device.held = self.clock.callLater(self.flapWindow, self._release, key)
        else:
            self._release(key)

    def _release(self, key: tuple[str, str]) -> None:
        device = self.devices.pop(key)
        device.held = None
        self._emit(USER_OFFLINE, self._offline(key, device.sessionId, device.reason))

    def _offline(self, key: tuple[str, str], sessionId: str, reason: str) -> OutboxEvent:
        uid, deviceId = key
        return self._ledger(userOffline(uid, deviceId, self.gateId, sessionId, reason))

    def _ledger(self, event: OutboxEvent) -> OutboxEvent:
        if event.presence is None:
            return event
        if not self.keepsLedger:
            return dataclasses.replace(event, presence=None)
        if self.ledger == self.gateId:
            return event
        uid, deviceId, _, sessionId = event.presence
        return dataclasses.replace(event, presence=(uid, deviceId, self.ledger, sessionId))

    # -- writing ------------------------------------------------------------------

    def _emit(self, eventType: str, event: OutboxEvent) -> None:
        if eventType not in self.eventTypes:
            return
        event = self._ledger(event)
        if self._blocked:
            if len(self._waiting) >= MAX_WAITING:
                self._dropped(1)
            else:
                self._waiting.append(event)
            return
        self._write([event])

    def _dropped(self, count: int) -> None:
        self.metrics.presenceDropped += count
        self.log.warn(
            "{count} presence event(s) not written: the store refused the earlier ones"
            " for too long",
            count=count,
        )

    def _write(self, events: list[OutboxEvent]) -> "Deferred[Any]":
        d = self.outbox.enqueue(events, int(self.clock.seconds() * 1000))
        self._writes.add(d)

        def written(kept: int) -> None:
            self._writes.discard(d)
            self.wake()

        def failed(failure: Failure) -> None:
            self._writes.discard(d)
            if failure.check(Unavailable):
                self.log.warn(
                    "cannot write {count} presence event(s) ({why}); retrying",
                    count=len(events),
                    why=failure.getErrorMessage(),
                )
            else:
                self.log.failure(
                    "writing {count} presence event(s) failed", failure, count=len(events)
                )
            # Kept, in order, before what comes next.
            self._waiting[:0] = events
            self._blocked = True
            if self._retryCall is None and not self.stopped:
                self._retryCall = self.clock.callLater(RETRY_DELAY, self._retry)

        d.addCallbacks(written, failed)
        return d

    def _retry(self) -> None:
        self._retryCall = None
        self._flush()

    def _flush(self) -> "Deferred[Any]":
        """
        Write what waits, in one write; unblock once it is written.
        """
        waiting, self._waiting = self._waiting, []
        if not waiting:
            self._blocked = False
            return succeed(None)
        self._blocked = True  # until this write is done

        def done(_: object) -> None:
            if not self._waiting and self._retryCall is None:
                self._blocked = False
            elif self._retryCall is None and not self.stopped:
                self._flush()

        return self._write(waiting).addCallback(done)

    # -- start and stop ------------------------------------------------------------

    def start(self) -> "Deferred[None]":
        """
        Report the devices a previous run of this gate left online
        (C{user.offline}, C{gate_restarted}), then what this run reported
        meanwhile.

        @return: a L{Deferred} firing once the leftovers were read (or
            failed, which is logged; a store that is unavailable is asked
            again after L{RETRY_DELAY}).
        """
        if self.stopped:
            return succeed(None)
        self.started = True
        if not self.keepsLedger:
            return self._flush().addCallback(lambda _: None)

        def found(rows: list[tuple[str, str, str]]) -> "Deferred[Any]":
            events = [
                self._ledger(
                    userOffline(
                        uid,
                        deviceId,
                        self.gateId if self.ledger == self.gateId else gateOfSession(sessionId),
                        sessionId,
                        GATE_RESTARTED,
                    )
                )
                for uid, deviceId, sessionId in rows
            ]
            if events:
                self.log.info(
                    "reporting {count} device(s) a previous run of this gate left online",
                    count=len(events),
                )
            self._waiting[:0] = events
            return self._flush()

        def failed(failure: Failure) -> "Deferred[Any] | None":
            if failure.check(Unavailable) and not self.stopped:
                self.log.warn(
                    "cannot read the presence ledger ({why}); retrying",
                    why=failure.getErrorMessage(),
                )
                retry: Deferred[Any] = Deferred()
                self.clock.callLater(RETRY_DELAY, lambda: self.start().chainDeferred(retry))
                return retry
            self.log.failure("reading the presence ledger failed", failure)
            return self._flush()

        d = self.outbox.presentOn(self.ledger)
        return d.addCallback(found).addErrback(failed).addCallback(lambda _: None)

    def stop(self) -> "Deferred[None]":
        """
        Report every device of this gate offline now: the held offlines,
        and (if the gate did not close them first) the live sessions; and
        write what waits.

        @return: a L{Deferred} firing once written (a failure is logged).
        """
        if self._retryCall is not None and self._retryCall.active():
            self._retryCall.cancel()
        self._retryCall = None
        for key, device in list(self.devices.items()):
            if device.held is not None:
                device.held.cancel()
                device.held = None
            self.devices.pop(key)
            self._waiting.append(self._offline(key, device.sessionId, device.reason))
        self._waiting = [e for e in self._waiting if e.type in self.eventTypes]
        self.stopped = True
        if self.started:
            self._flush()
        writes = list(self._writes)
        return DeferredList(writes, consumeErrors=True).addCallback(lambda _: None)


@implementer(ISessionRegistry)
class PresenceRegistry:
    """
    The gate's session registry, telling a L{PresenceNotifier} what
    registers and unregisters; everything else is the wrapped registry's.
    """

    def __init__(self, registry: Any, notifier: PresenceNotifier) -> None:
        self.registry = registry
        self.notifier = notifier

    def __repr__(self) -> str:
        return "<PresenceRegistry {!r}>".format(self.registry)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.registry, name)

    def register(self, session: Any) -> "Deferred[Any]":
        def registered(displaced: Any) -> Any:
            self.notifier.online(session)
            return displaced

        return self.registry.register(session).addCallback(registered)

    def unregister(self, session: Any) -> "Deferred[bool]":
        # Whatever the registry answers: the session ends now (one
        # displaced already is not reported twice).
        reason = KICKED if getattr(session, "kickedFor", None) is not None else CLOSED
        self.notifier.offline(session, reason)
        return self.registry.unregister(session)

    def sessionsFor(self, uid: str) -> "Deferred[Any]":
        return self.registry.sessionsFor(uid)

    def sessionsForMany(self, uids: Any) -> "Deferred[Any]":
        return self.registry.sessionsForMany(uids)

    def count(self) -> "Deferred[int]":
        return self.registry.count()

    def broadcast(self, frame: bytes) -> "Deferred[int]":
        return self.registry.broadcast(frame)
