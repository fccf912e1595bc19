# -*- test-case-name: tests.test_webhooks,tests.test_tap -*-
"""
Webhooks in the gate's service tree: the options' checks (L{checkOptions})
and L{makeWebhooks}, which L{imserver.tap.makeService} calls with
C{--webhook}; without it nothing here is loaded and the store records no
event.

The L{WebhookService} sits under the root service after the message store
and before the gate: it starts after the store (in cluster mode once Redis
is connected) and stops after the gate closed its sessions, writing their
held offlines, and before the store closes.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python import usage

from imserver.webhooks.events import (
    EVENT_TYPES,
    GROUP_CHANGED,
    MESSAGE_STORED,
    USER_OFFLINE,
    USER_ONLINE,
)

if TYPE_CHECKING:
    from imserver.webhooks.metrics import WebhookMetrics
    from imserver.webhooks.presence import PresenceNotifier
    from imserver.webhooks.sender import WebhookSender

#: The event types the store records in the transaction of the change.
STORE_EVENTS = frozenset({MESSAGE_STORED, GROUP_CHANGED})
#: The presence event types, written by the gate.
PRESENCE_EVENTS = frozenset({USER_ONLINE, USER_OFFLINE})


def parseEvents(text: str | None) -> frozenset[str]:
    """
    Parse C{--webhook-events}: a comma-separated list of event types.

    @param text: the option's value, or L{None} for every type.
    @raise ValueError: naming an unknown type, or if none is given.
    """
    if text is None:
        return frozenset(EVENT_TYPES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("names no event type")
    unknown = [name for name in names if name not in EVENT_TYPES]
    if unknown:
        raise ValueError("unknown event type {}".format(", ".join(unknown)))
    return frozenset(names)


def checkOptions(options: Any) -> None:
    """
    Check the C{--webhook*} options (L{imserver.tap.Options.postOptions}):
    sets C{options.webhookURL} (bytes or L{None}) and
    C{options.webhookEvents}.

    @raise usage.UsageError: naming the option, if one is wrong.
    """
    url = options["webhook"]
    options.webhookURL = None
    options.webhookEvents = frozenset()
    if url is None or url.lower() == "none":
        for option in ("webhook-events", "webhook-secret-file", "webhook-ca"):
            if options[option] is not None:
                raise usage.UsageError("--{} goes with --webhook".format(option))
        return
    from imserver.httpclient import checkURL, trustRootFor

    try:
        options.webhookURL = checkURL(url)
    except ValueError as e:
        raise usage.UsageError(
            "--webhook {}: {}; give an http:// or https:// URL".format(
                url.split("@")[-1] if "@" in url else url, e
            )
        )
    try:
        options.webhookEvents = parseEvents(options["webhook-events"])
    except ValueError as e:
        raise usage.UsageError(
            "--webhook-events: {}; give a comma-separated list of {}".format(
                e, ", ".join(EVENT_TYPES)
            )
        )
    if options["webhook-ca"] is not None:
        if not options.webhookURL.lower().startswith(b"https:"):
            raise usage.UsageError("--webhook-ca goes with an https:// --webhook")
        try:
            trustRootFor(options["webhook-ca"])
        except OSError as e:
            raise usage.UsageError(
                "--webhook-ca {}: cannot read it ({}); give the PEM file of the CA that"
                " signs the receiver's certificate".format(options["webhook-ca"], e.strerror or e)
            )
        except ValueError as e:
            raise usage.UsageError(
                "--webhook-ca {}: {}; give the PEM file of the CA that signs the"
                " receiver's certificate".format(options["webhook-ca"], e)
            )
    secretFile = options["webhook-secret-file"]
    if secretFile is not None:
        from twisted.python.filepath import FilePath

        from imserver.auth import MIN_SECRET_LENGTH

        try:
            content = FilePath(secretFile).getContent()
        except OSError as e:
            raise usage.UsageError(
                "--webhook-secret-file {}: cannot read it ({}); give a readable file holding"
                " at least {} bytes".format(secretFile, e.strerror or e, MIN_SECRET_LENGTH)
            )
        if len(content.strip()) < MIN_SECRET_LENGTH:
            raise usage.UsageError(
                "--webhook-secret-file {}: holds fewer than {} bytes; give a longer secret".format(
                    secretFile, MIN_SECRET_LENGTH
                )
            )


@dataclass
class Webhooks:
    """
    What L{makeWebhooks} built.

    @ivar service: the L{WebhookService}, to add under the root.
    @ivar sender: its L{WebhookSender}.
    @ivar notifier: its L{PresenceNotifier}, or L{None} without presence
        events.
    @ivar metrics: the L{WebhookMetrics}.
    """

    service: "WebhookService"
    sender: "WebhookSender"
    notifier: "PresenceNotifier | None"
    metrics: "WebhookMetrics"

    def wrapRegistry(self, registry: Any) -> Any:
        """
        The registry the gate's sessions register with: C{registry}, told
        to the presence notifier if there is one.
        """
        if self.notifier is None:
            return registry
        from imserver.webhooks.presence import PresenceRegistry

        return PresenceRegistry(registry, self.notifier)


def makeWebhooks(
    options: Any,
    store: Any,
    reactor: Any,
    gateId: str,
    registry: Any,
    secret: bytes,
    embedded: bool,
    ready: Any = None,
) -> Webhooks:
    """
    Build the webhook side of a gate for checked options (L{checkOptions}),
    and tell C{store} which events to record and how many to keep.

    @param registry: the gate's L{prometheus_client.CollectorRegistry}.
    @param secret: the webhook secret.
    @param embedded: whether the store is this gate's alone (not cluster
        mode): the presence ledger is then kept under
        L{imserver.webhooks.presence.EMBEDDED_LEDGER}.
    @param ready: in cluster mode, returns a L{Deferred} firing once the
        store can be used (L{imserver.cluster.ClusterService.whenReady}).
    """
    from imserver.httpclient import trustRootFor
    from imserver.webhooks.http import HTTPPoster
    from imserver.webhooks.metrics import WebhookMetrics
    from imserver.webhooks.presence import EMBEDDED_LEDGER, PresenceNotifier
    from imserver.webhooks.sender import WebhookSender

    settings = options.settings
    events = options.webhookEvents
    store.outboxEvents = frozenset(events & STORE_EVENTS)
    store.outboxLimit = settings.outbox_max_events
    metrics = WebhookMetrics(registry, reactor, lambda: store.outboxDropped)
    trustRoot = None
    if options["webhook-ca"] is not None:
        trustRoot = trustRootFor(options["webhook-ca"])
    poster = HTTPPoster(
        reactor,
        options.webhookURL,
        secret,
        settings.webhook_timeout,
        settings.webhook_concurrency,
        trustRoot,
    )
    sender = WebhookSender(store, poster.post, reactor, settings, gateId, metrics)
    notifier = None
    if events & PRESENCE_EVENTS:
        notifier = PresenceNotifier(
            store,
            reactor,
            gateId,
            settings.presence_flap_window,
            metrics,
            events & PRESENCE_EVENTS,
            ledger=EMBEDDED_LEDGER if embedded else None,
            wake=sender.wake,
        )
    service = WebhookService(sender, notifier, poster, ready, options.webhookURL)
    return Webhooks(service, sender, notifier, metrics)


class WebhookService(Service):
    """
    Runs the webhook sender and the presence notifier.

    Starting it reports what a previous run left online, then sends.
    Stopping it writes the presence events still held, then stops sending:
    the requests in flight are cancelled, and nothing undelivered is
    removed from the outbox.
    """

    log = Logger()

    def __init__(
        self,
        sender: "WebhookSender",
        notifier: "PresenceNotifier | None",
        poster: Any = None,
        ready: Any = None,
        url: bytes = b"",
    ) -> None:
        self.setName("webhooks")
        self.sender = sender
        self.notifier = notifier
        self.poster = poster
        self.ready = ready
        self.url = url

    def startService(self) -> None:
        Service.startService(self)
        if self.ready is None:
            self._start()
        else:
            self.ready().addCallback(lambda _: self._start() if self.running else None)

    def _start(self) -> None:
        self.log.info(
            "webhooks to {url}",
            url=self.url.decode("ascii").split("?")[0],
        )
        if self.notifier is not None:
            self.notifier.start()
        self.sender.start()

    def stopService(self) -> "Deferred[None]":
        Service.stopService(self)
        d: Deferred[Any] = succeed(None)
        if self.notifier is not None:
            d = self.notifier.stop()
        d.addBoth(lambda _: self.sender.stop())
        if self.poster is not None:
            d.addBoth(lambda _: self.poster.close())
        return d.addBoth(lambda _: None)


def fromOptions(
    options: Any,
    store: Any,
    reactor: Any,
    gateId: str,
    registry: Any,
    dataDir: Any,
    embedded: bool,
) -> Webhooks | None:
    """
    L{makeWebhooks} for C{twistd im}'s options, with the webhook secret
    loaded (or generated into the data directory).

    @return: L{None} without C{--webhook}.
    @raise imserver.service.StartupError: if the secret cannot be loaded
        or made.
    """
    if getattr(options, "webhookURL", None) is None:
        return None
    from imserver.service import StartupError
    from imserver.webhooks.signing import loadWebhookSecret

    secretFile = options["webhook-secret-file"]
    try:
        secret = loadWebhookSecret(dataDir, secretFile)
    except (OSError, ValueError) as e:
        raise StartupError(
            "{}: {}".format(
                "--webhook-secret-file" if secretFile else "--data-dir " + dataDir.path, e
            )
        )
    return makeWebhooks(options, store, reactor, gateId, registry, secret, embedded)
