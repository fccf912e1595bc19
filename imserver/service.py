# -*- test-case-name: tests.test_service -*-
"""
C{twisted.application} services that make up a gate process.
"""

from twisted.application.service import MultiService, Service
from twisted.internet.defer import gatherResults, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.observe import OneShot


class ListenerService(Service):
    """
    Listen on one endpoint while running.

    Like Twisted's C{StreamServerEndpointService} run by twistd: a listen
    error that happens at once (port in use, bad interface) is raised from
    L{startService}, so the process fails to start instead of running deaf.

    @ivar port: the L{IListeningPort} once listening, else L{None}.
    """

    log = Logger()

    def __init__(self, description, endpoint, factory):
        self.setName("listen " + description)
        self.endpoint = endpoint
        self.factory = factory
        self.port = None
        self._listening = OneShot()

    def startService(self):
        Service.startService(self)
        if self._listening.fired:
            # Started again after a stop: wait for the new port.
            self._listening = OneShot()
        self.endpoint.listen(self.factory).addBoth(self._listenDone)
        if isinstance(self._listening.result, Failure):
            self._listening.result.raiseException()

    def _listenDone(self, result):
        if isinstance(result, Failure):
            self.log.failure("{name} cannot listen", result, name=self.name)
        else:
            self.port = result
            self.log.info(
                "{name} listening on {address}",
                name=self.name,
                address=_format(result.getHost()),
            )
        self._listening.fire(result)

    def whenListening(self):
        """
        @return: a L{Deferred} firing with the L{IListeningPort}, or failing
            with the reason listening failed.
        """
        return self._listening.when()

    def stopService(self):
        Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


def _format(address):
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    if ":" in host:
        host = "[{}]".format(host)
    return "{}:{}".format(host, address.port)


class GateService(MultiService):
    """
    The listeners of one gate, its connections and their idle sweep.

    Stopping it stops listening first, then closes every connection with a
    C{SERVER_SHUTDOWN} error (aborting stragglers after the grace period),
    then stops the sweep.

    @ivar factory: the L{imserver.protocol.GateFactory}.
    @ivar listeners: a L{ListenerService} per endpoint.
    """

    def __init__(self, factory, endpoints):
        """
        @param endpoints: C{(description, IStreamServerEndpoint)} pairs.
        """
        MultiService.__init__(self)
        self.setName("gate")
        self.factory = factory
        self.listeners = []
        for description, endpoint in endpoints:
            listener = ListenerService(description, endpoint, factory)
            listener.setServiceParent(self)
            self.listeners.append(listener)
        self._loops = []
        for function, interval in [
            (factory.sweep, factory.settings.sweep_interval),
            (factory.flushCursors, factory.settings.cursor_flush_interval),
        ]:
            loop = LoopingCall(function)
            loop.clock = factory.clock
            self._loops.append((loop, interval))

    def startService(self):
        MultiService.startService(self)
        for loop, interval in self._loops:
            loop.start(interval, now=False)

    def stopService(self):
        d = MultiService.stopService(self)
        d.addCallback(lambda _: self.factory.shutdown())

        def stopLoops(result):
            for loop, interval in self._loops:
                if loop.running:
                    loop.stop()
            return result

        d.addBoth(stopLoops)
        # The last cursors are written even if closing connections failed.
        d.addBoth(lambda result: self.factory.flushCursors().addCallback(lambda _: result))
        return d

    def addresses(self):
        """
        @return: a L{Deferred} firing with the listening addresses
            (C{IAddress}), in the order of the endpoints.
        """
        return gatherResults(
            [listener.whenListening() for listener in self.listeners]
        ).addCallback(lambda ports: [p.getHost() for p in ports])


class ServerService(MultiService):
    """
    The root service.  Children start in the order they were added and stop
    one after another in reverse order (the gate drains its connections
    before the store under it closes), not all at once as
    C{MultiService} does.
    """

    log = Logger()

    def stopService(self):
        Service.stopService(self)
        d = succeed(None)
        for child in reversed(list(self)):
            d.addCallback(lambda _, child=child: child.stopService())
            d.addErrback(
                lambda f, child=child: self.log.failure(
                    "stopping {name} failed", f, name=child.name
                )
            )
        return d


class RetentionService(Service):
    """
    Applies the retention settings to the message store every
    C{retention_interval} seconds.
    """

    log = Logger()

    def __init__(self, store, clock, settings):
        self.setName("retention")
        self.store = store
        self.clock = clock
        self.settings = settings
        self._loop = LoopingCall(self.trim)
        self._loop.clock = clock

    def startService(self):
        Service.startService(self)
        # Also at start: a gate restarted more often than the interval
        # still trims.
        self._loop.start(self.settings.retention_interval, now=True)

    def stopService(self):
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()

    def trim(self):
        """
        One retention pass.

        @return: a L{Deferred} firing with the number of entries removed.
        """
        settings = self.settings
        d = self.store.trim(
            int(self.clock.seconds() * 1000),
            int(settings.retention_age * 1000),
            settings.retention_count,
        )

        def done(removed):
            if removed:
                self.log.info("retention removed {n} inbox entries", n=removed)
            return removed

        def failed(failure):
            self.log.failure("retention pass failed", failure)

        return d.addCallbacks(done, failed)


class ApiService(ListenerService):
    """
    The HTTP API's listener (L{imserver.api}).

    Stopping it stops listening, waits for the requests in flight, then
    closes the API's connections, aborting those still open after the
    grace period.

    @ivar site: the L{imserver.api.ApiSite}.
    """

    def __init__(self, description, endpoint, site, clock, grace):
        from imserver.api import ConnectionTracker
        from imserver.endpoints import splitDescription

        ListenerService.__init__(self, description, endpoint, ConnectionTracker(site))
        self.setName("api")
        self.scheme = "https" if splitDescription(description)[0][0].lower() == "ssl" else "http"
        self.site = site
        self.clock = clock
        self.grace = grace

    def _listenDone(self, result):
        if isinstance(result, Failure):
            self.log.failure("the HTTP API cannot listen", result)
        else:
            self.port = result
            self.log.info(
                "HTTP API at {scheme}://{address}/",
                scheme=self.scheme,
                address=_format(result.getHost()),
            )
        self._listening.fire(result)

    def stopService(self):
        d = maybeDeferred(ListenerService.stopService, self)
        return d.addCallback(lambda _: self.factory.drain(self.clock, self.grace))


def advertisedAddresses(descriptions, addresses, hostname):
    """
    The client addresses a gate advertises by default: one per listener
    with a host and port, TLS for C{ssl:} listeners; a wildcard interface
    (C{0.0.0.0}, C{::}) is replaced by the machine's host name.

    @param descriptions: the C{--listen} endpoint strings.
    @param addresses: their listening addresses, in the same order.
    @param hostname: the machine's host name.
    @return: a L{list} of C{(host, port, tls)}.
    """
    from imserver.endpoints import splitDescription

    result = []
    for description, address in zip(descriptions, addresses):
        host = getattr(address, "host", None)
        port = getattr(address, "port", None)
        if host is None or port is None:
            continue
        if host in ("", "0.0.0.0", "::"):
            host = hostname
        args, _ = splitDescription(description)
        result.append((host, port, args[0].lower() == "ssl"))
    return result


class AdvertiseService(Service):
    """
    Publishes this gate's client addresses in the gate directory (the
    dispatcher's source) once its listeners listen, and withdraws them when
    stopping.

    @ivar addresses: the C{(host, port, tls)} advertised, once known.
    """

    log = Logger()

    def __init__(self, directory, gateId, gate, descriptions, explicit=(),
                 hostname=None):
        """
        @param gate: the L{GateService}.
        @param descriptions: its C{--listen} endpoint strings.
        @param explicit: C{(host, port, tls)} from C{--advertise}; if given
            they are advertised instead of the listening addresses.
        @param hostname: the host name for wildcard listeners (default:
            C{socket.gethostname()}).
        """
        self.setName("advertise")
        self.directory = directory
        self.gateId = gateId
        self.gate = gate
        self.descriptions = list(descriptions)
        self.explicit = list(explicit)
        self.hostname = hostname
        self.addresses = None

    def startService(self):
        Service.startService(self)
        if self.explicit:
            d = succeed(self.explicit)
        else:
            import socket

            hostname = self.hostname or socket.gethostname()
            d = self.gate.addresses().addCallback(
                lambda found: advertisedAddresses(self.descriptions, found, hostname)
            )
        d.addCallback(self._advertise)
        d.addErrback(lambda f: self.log.failure("advertising the gate failed", f))

    def _advertise(self, addresses):
        self.addresses = addresses
        self.log.info(
            "advertising gate {gate} at {addresses}",
            gate=self.gateId,
            addresses=", ".join(
                "{}:{}{}".format(host, port, "" if tls else " (plaintext)")
                for host, port, tls in addresses
            ),
        )
        return self.directory.advertise(self.gateId, addresses)

    def stopService(self):
        Service.stopService(self)
        return self.directory.withdraw(self.gateId).addErrback(
            lambda f: self.log.failure("withdrawing the gate failed", f)
        )
