# -*- test-case-name: tests.test_service -*-
"""
C{twisted.application} services that make up a gate process, in either
mode; cluster mode's own is L{imserver.cluster.ClusterService}.
"""

import errno
import gc
import sys

from twisted.application.service import MultiService, Service
from twisted.internet.defer import gatherResults, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.errors import Unavailable
from imserver.observe import OneShot


class StartupError(SystemExit, Exception):
    """
    The gate cannot start.  Its message is one line naming the option at
    fault and what to do about it, and is all the user sees: no traceback.

    It is a L{SystemExit}, because that is how a twistd process ends
    with an exit status and a message but no traceback.  twistd prints a
    traceback for any other exception from C{makeService} or from starting
    the services, and its whole usage text above a C{UsageError}; it lets
    a L{SystemExit} through, and Python prints an uncaught one's message
    to standard error and exits with status 1 (twistd's own
    C{sys.exit("Another twistd server is running...")} works so).  Stopping
    the reactor instead would exit with status 0: this twistd has no
    setting for the exit status.  It is also an L{Exception}, so that
    twistd's runner, which catches L{Exception} from starting the
    services, still removes its pidfile and tells a daemon's parent why
    (which prints C{An error has occurred: ...}) before letting it
    through; and so that tests and callers can catch it like any error.
    """

    def __init__(self, message):
        SystemExit.__init__(self, message)


#: What to do when a listener cannot bind, by C{errno}.
_LISTEN_REMEDIES = {
    errno.EADDRINUSE: "stop the program using that port or choose another one",
    errno.EACCES: "choose a port above 1023, or start twistd as root with --uid",
    errno.EADDRNOTAVAIL: "choose an interface= address this machine has",
}


class ListenerService(Service):
    """
    Listen on one endpoint while running.

    Like Twisted's C{StreamServerEndpointService}, it listens in
    L{privilegedStartService}, which twistd calls on every service before
    it starts any (and before it drops privileges for C{--uid}), or in
    L{startService} if that was not called.  A listen error that happens at
    once (port in use, bad interface) raises a L{StartupError} naming the
    option and the address, so the process stops before anything else has
    started (the message store has not opened its database) instead of
    running deaf.

    @ivar port: the L{IListeningPort} once listening, else L{None}.
    @ivar option: the command-line option the endpoint comes from, for
        messages.
    """

    log = Logger()

    def __init__(self, description, endpoint, factory, option="--listen"):
        self.setName("listen " + description)
        self.description = description
        self.option = option
        self.endpoint = endpoint
        self.factory = factory
        self.port = None
        self._listening = OneShot()
        self._listenCalled = False
        self._starting = False

    def privilegedStartService(self):
        Service.privilegedStartService(self)
        self._listen()

    def startService(self):
        Service.startService(self)
        if not self._listenCalled:
            self._listen()

    def _listen(self):
        self._listenCalled = True
        if self._listening.fired:
            # Started again after a stop: wait for the new port.
            self._listening = OneShot()
        self._starting = True
        try:
            self.endpoint.listen(self.factory).addBoth(self._listenDone)
        finally:
            self._starting = False
        if isinstance(self._listening.result, Failure):
            raise StartupError(self.cannotListen(self._listening.result))

    def cannotListen(self, failure):
        """
        The one line saying that this listener cannot listen, why, and
        what to do.

        @param failure: the L{Failure} the endpoint's listen failed with.
        """
        reason = failure.value
        socketError = getattr(reason, "socketError", None)
        remedy = "check {}".format(self.option)
        if isinstance(socketError, OSError) and socketError.strerror:
            why = socketError.strerror
            remedy = _LISTEN_REMEDIES.get(socketError.errno, remedy)
        else:
            why = failure.getErrorMessage()
        port = getattr(reason, "port", None)
        where = ""
        if port is not None:
            where = " on " + _listenAddress(getattr(reason, "interface", None), port)
        return "{} {}: cannot listen{}: {}; {}".format(
            self.option, self.description, where, why, remedy
        )

    def _listenDone(self, result):
        if isinstance(result, Failure):
            if not self._starting:
                # Too late for a StartupError: the process runs on without
                # this listener.
                self.log.error("{message}", message=self.cannotListen(result))
        else:
            self.port = result
            self.listened(result)
        self._listening.fire(result)

    def listened(self, port):
        """
        Log that the endpoint listens.

        @param port: its L{IListeningPort}.
        """
        self.log.info(
            "{name} listening on {address}",
            name=self.name,
            address=_format(port.getHost()),
        )

    def whenListening(self):
        """
        @return: a L{Deferred} firing with the L{IListeningPort}, or failing
            with the reason listening failed.
        """
        return self._listening.when()

    def stopService(self):
        Service.stopService(self)
        self._listenCalled = False
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


def _listenAddress(interface, port):
    """
    The address of a L{CannotListenError}: C{HOST:PORT} (C{*} for every
    interface), or a UNIX socket's path.
    """
    if not isinstance(port, int):
        return str(port)
    host = interface or "*"
    if ":" in host:
        host = "[{}]".format(host)
    return "{}:{}".format(host, port)


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
            for loop, _ in self._loops:
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
        return gatherResults([listener.whenListening() for listener in self.listeners]).addCallback(
            lambda ports: [p.getHost() for p in ports]
        )


class ServerService(MultiService):
    """
    The root service.  Children start in the order they were added and stop
    one after another in reverse order (the gate drains its connections
    before the store under it closes), not all at once as
    C{MultiService} does.
    """

    log = Logger()

    #: Whether L{startService} freezes the heap (C{twistd im} sets it; not
    #: in tests, which start many gates in one process).
    freezeHeap = False

    def startService(self):
        MultiService.startService(self)
        if self.freezeHeap:
            # What is alive once the gate is up (modules, classes, the
            # service tree: ~64,000 objects) lives as long as the process:
            # out of the collector's way, a full collection walks only what
            # came since (connections, sessions), not all of it each time.
            gc.collect()
            gc.freeze()

    def privilegedStartService(self):
        # twistd calls this on the root (and nothing else does) before
        # startService: the listeners bind here, and a StartupError ends
        # the process (see StartupError).  By now twistd has redirected
        # sys.stderr into its log, where Python prints the message (stdout
        # with -n, the --logfile otherwise): write it to the process's own
        # standard error too, as twistd does for a daemon that failed to
        # start, so that a user at a terminal reads it there.
        try:
            MultiService.privilegedStartService(self)
        except StartupError as e:
            stderr = sys.__stderr__
            if stderr is not None and sys.stderr is not stderr:
                stderr.write("{}\n".format(e))
                stderr.flush()
            raise

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

    In cluster mode every gate has one, and a lease makes one gate at a
    time run the passes: each interval a gate runs a pass only if it holds
    the lease, which it takes when nobody holds it and extends while it
    does (for L{LEASE_INTERVALS} intervals), so another gate takes over
    within about that long after the holder died.  On a Redis Cluster there
    is a lease and a pass per primary (C{shards}), each gate running its
    share of them.

    @ivar passes: the passes run.
    @ivar skipped: the intervals this gate held no lease.
    """

    log = Logger()

    #: How many intervals the lease lasts: more than one, so the holder's
    #: next pass extends it before it lapses.
    LEASE_INTERVALS = 2

    def __init__(self, store, clock, settings, ready=None, lease=None, shards=None):
        """
        @param ready: if given, called at start; returns a L{Deferred} that
            fires when the store can be used (cluster mode: Redis is
            connected), and the passes start then.
        @param lease: if given, called as C{lease(ttlMs)} before each
            pass; returns a L{Deferred} firing with whether this gate holds
            the lease now (for C{ttlMs}); the pass runs only if so.
        @param shards: instead of one lease and one pass, a lease and a
            pass per shard (a Redis Cluster's primaries): if given, called
            before each interval's passes, returns C{(quota, [(lease,
            trim), ...])}: the shards in the order this gate tries them,
            each with its lease (as C{lease} above) and its pass (called as
            the store's C{trim}); this gate runs the passes of the first
            C{quota} shards whose lease it holds.
        """
        self.setName("retention")
        self.store = store
        self.clock = clock
        self.settings = settings
        self.ready = ready
        self.lease = lease
        self.shards = shards
        self.passes = 0
        self.skipped = 0
        self._loop = LoopingCall(self.trim)
        self._loop.clock = clock

    def startService(self):
        Service.startService(self)
        if self.ready is None:
            self._startLoop()
        else:
            self.ready().addCallback(lambda _: self._startLoop() if self.running else None)

    def _startLoop(self):
        # Also at start: a gate restarted more often than the interval
        # still trims.
        if not self._loop.running:
            self._loop.start(self.settings.retention_interval, now=True)

    def stopService(self):
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()

    def trim(self):
        """
        One retention pass, if this gate holds the lease (when there is
        one).

        @return: a L{Deferred} firing with the number of entries removed
            (L{None} if the pass was skipped, or failed).
        """
        if self.shards is not None:
            d = self._shardPasses()
        elif self.lease is None:
            d = self._pass()
        else:
            d = self.lease(self._leaseMs()).addCallback(self._leased)
        return d.addErrback(self._failed)

    def _leaseMs(self):
        return max(1, int(self.settings.retention_interval * self.LEASE_INTERVALS * 1000))

    def _leased(self, holding):
        if not holding:
            self.skipped += 1
            return None
        return self._pass()

    @inlineCallbacks
    def _shardPasses(self):
        """
        The passes of the shards whose leases this gate holds, at most the
        quota; an interval with none counts as skipped.

        @return: a L{Deferred} firing with the entries removed, or L{None}.
        """
        quota, shards = self.shards()
        held, removed = 0, 0
        for lease, trim in shards:
            if held >= quota:
                break
            if (yield lease(self._leaseMs())):
                held += 1
                removed += yield self._pass(trim)
        if not held:
            self.skipped += 1
            return None
        return removed

    def _pass(self, trim=None):
        settings = self.settings
        self.passes += 1
        d = (trim or self.store.trim)(
            int(self.clock.seconds() * 1000),
            int(settings.retention_age * 1000),
            settings.retention_count,
        )

        def done(removed):
            if removed:
                self.log.info("retention removed {n} inbox entries", n=removed)
            return removed

        return d.addCallback(done)

    def _failed(self, failure):
        if failure.check(Unavailable):
            self.log.warn("retention pass postponed: {why}", why=failure.getErrorMessage())
        else:
            self.log.failure("retention pass failed", failure)


class WebService(ListenerService):
    """
    The web listener (C{--web}, L{imserver.web}): a gate listener whose
    log line gives the chat page's and the WebSocket's addresses.
    """

    def __init__(self, description, endpoint, site):
        from imserver.endpoints import splitDescription

        ListenerService.__init__(self, "web " + description, endpoint, site, option="--web")
        self.setName("web")
        self.secure = splitDescription(description)[0][0].lower() == "ssl"

    def stopService(self):
        """
        Stop listening, and drop the connections still in HTTP (page
        requests, upgrades under way): the WebSocket sessions are the
        gate's, closed by its shutdown.
        """
        d = maybeDeferred(ListenerService.stopService, self)

        def dropHTTP(result):
            for channel in list(self.factory.http):
                if channel.transport is not None:
                    channel.transport.abortConnection()
            return result

        return d.addCallback(dropHTTP)

    def listened(self, port):
        address = _format(port.getHost())
        self.log.info(
            "chat page at {scheme}://{address}/, WebSocket at {ws}://{address}/ws",
            scheme="https" if self.secure else "http",
            ws="wss" if self.secure else "ws",
            address=address,
        )


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

        ListenerService.__init__(
            self, description, endpoint, ConnectionTracker(site), option="--api"
        )
        self.setName("api")
        self.scheme = "https" if splitDescription(description)[0][0].lower() == "ssl" else "http"
        self.site = site
        self.clock = clock
        self.grace = grace

    def listened(self, port):
        self.log.info(
            "HTTP API at {scheme}://{address}/",
            scheme=self.scheme,
            address=_format(port.getHost()),
        )

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

    def __init__(self, directory, gateId, gate, descriptions, explicit=(), hostname=None):
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
        return self.directory.withdraw(self.gateId).addErrback(self._withdrawFailed)

    def _withdrawFailed(self, failure):
        if failure.check(Unavailable):
            # Its lease lapses by itself: the gate drops out of the list.
            self.log.warn("withdrawing the gate postponed: {why}", why=failure.getErrorMessage())
        else:
            self.log.failure("withdrawing the gate failed", failure)


class CertificateReloadService(Service):
    """
    Reads the TLS certificate files again on C{SIGHUP}: new connections get
    the new certificate, open ones keep theirs
    (L{imserver.tls.ReloadableServerOptions}).  Renew a certificate by
    replacing its files, then C{kill -HUP <pid>}.

    Also rotates the TLS session ticket keys every C{rotation} seconds
    (C{--tls-ticket-rotation}): a new context for each listener, from its
    files.

    @ivar certificates: the L{imserver.tls.ReloadableServerOptions} of the
        TLS listeners.
    """

    log = Logger()

    def __init__(self, certificates, reactor, rotation=None):
        self.setName("certificates")
        self.certificates = list(certificates)
        self.reactor = reactor
        self.rotation = rotation
        self._previous = None
        self._rotating = LoopingCall(self.rotate)
        self._rotating.clock = reactor

    def startService(self):
        Service.startService(self)
        if self.rotation:
            self._rotating.start(self.rotation, now=False)
        import signal

        try:
            self._previous = signal.signal(signal.SIGHUP, self._signalled)
        except ValueError:  # not the main thread: reload() still works
            self._previous = None

    def stopService(self):
        Service.stopService(self)
        if self._rotating.running:
            self._rotating.stop()
        if self._previous is not None:
            import signal

            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _signalled(self, signum, frame):
        # A signal handler may run between any two bytecodes: leave the
        # work to the reactor.
        self.reactor.callFromThread(self.reload)

    def reload(self):
        """
        Reload every certificate.

        @return: how many were reloaded (the others keep their current
            certificate; the reason is logged).
        """
        self.log.info("reloading {n} TLS certificate(s)", n=len(self.certificates))
        return sum(1 for options in self.certificates if options.reload())

    def rotate(self):
        """
        Replace every listener's session ticket keys.

        @return: how many were replaced.
        """
        rotated = sum(1 for options in self.certificates if options.rotate())
        self.log.info("rotated the TLS session ticket keys of {n} listener(s)", n=rotated)
        return rotated
