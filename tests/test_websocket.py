# -*- test-case-name: tests.test_websocket -*-
"""
The web listener over real loopback sockets: the service tree of C{twistd
im} with C{--web}, WebSocket clients of both subprotocols (autobahn's, from
L{tests.support.websocket}) and TCP clients of the client library, talking
to each other through one gate.
"""

import base64
import json
import socket
import ssl as stdlib_ssl
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from imserver import tap
from imserver.auth import loadSecret, mintToken
from imserver.client import connect
from imserver.datadir import CERT_FILE_NAME, KEY_FILE_NAME
from imserver.pb import im_pb2 as pb
from imserver.tls import makeSelfSigned
from imserver.transport import socketTransport
from imserver.web.websocket import CLOSE_ERROR_BASE

from tests.support import serverEnvironment, startServer, withoutSecretEnvironment
from tests.support.live import waitFor, withDeadline
from tests.support.websocket import (
    JSON,
    PROTO,
    Collect,
    connectWS,
    rawHTTP,
    upgradeRequest,
)
from tests.test_closing import RawClient


def b64(data):
    return base64.b64encode(data).decode("ascii")


class WebGate:
    """
    A gate started in this process with a plain C{tcp:} client listener
    and a C{--web} listener, both on OS-chosen loopback ports.
    """

    def __init__(self, testCase, *args):
        self.testCase = testCase
        self.dataDir = FilePath(testCase.mktemp())
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.dataDir.path,
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--web",
                "tcp:0:interface=127.0.0.1",
                "--api",
                "none",
                "--store",
                "memory",
            ]
            + list(args)
        )
        env = serverEnvironment()
        withoutSecretEnvironment(testCase)
        self.root = startServer(testCase, options)
        self.gate = self.root.getServiceNamed("gate")
        self.factory = self.gate.factory
        self.site = self.gate.web.factory
        self.secret = loadSecret(self.dataDir, environ=env)

    @inlineCallbacks
    def ports(self):
        [address] = yield self.gate.addresses()
        self.tcpPort = address.port
        port = yield self.gate.web.whenListening()
        self.webPort = port.getHost().port

    def token(self, uid):
        return mintToken(self.secret, uid, 60, time.time())

    @inlineCallbacks
    def ws(self, uid=None, device="browser", protocol=JSON, lastSeq=0, **kwargs):
        """
        A WebSocket client, authenticated as C{uid} if given; closed at
        cleanup.
        """
        client = yield connectWS(self.webPort, [protocol], **kwargs)
        self.testCase.addCleanup(self.closeWS, client)
        if uid is not None:
            response = yield self.auth(client, uid, device, lastSeq)
            if client.json:
                self.testCase.assertNotIn("error", response)
            else:
                self.testCase.assertFalse(response.HasField("error"))
        return client

    def auth(self, client, uid, device="browser", lastSeq=0, token=None):
        token = self.token(uid) if token is None else token
        if client.json:
            body = {
                "uid": uid,
                "token": token,
                "deviceId": device,
                "platform": "WEB",
                "lastSeq": str(lastSeq),
            }
        else:
            body = pb.AuthRequest(
                uid=uid, token=token, device_id=device, platform=pb.WEB, last_seq=lastSeq
            )
        return client.call("auth", body)

    def closeWS(self, client):
        if client.state != client.STATE_CLOSED:
            client.sendClose(1000)
        return client.closed

    @inlineCallbacks
    def tcp(self, uid, device="phone", lastSeq=0):
        """
        An authenticated TCP client of the client library, keeping what it
        is pushed in C{client.pushed}; closed at cleanup.
        """
        pushed = []
        client = yield connect(
            reactor,
            "127.0.0.1",
            self.tcpPort,
            uid=uid,
            token=self.token(uid),
            deviceId=device,
            lastSeq=lastSeq,
            onNotify=lambda name, message: pushed.append((name, message)),
            tls=False,
        )
        client.pushed = pushed
        self.testCase.addCleanup(client.close)
        return client


class WebSocketDeliveryTests(TestCase):
    """
    Auth, ping, 1:1 and group delivery, resume and kicks over WebSocket,
    between WebSocket and TCP clients of one gate.
    """

    timeout = 30

    @inlineCallbacks
    def setUp(self):
        self.web = WebGate(self)
        yield self.web.ports()

    @inlineCallbacks
    def test_jsonAuthAndPing(self):
        """
        On C{imserver.v1.json}, auth and ping are answered as JSON objects
        in the canonical mapping: camelCase names, 64-bit integers as
        strings, 32-bit ones as numbers.
        """
        client = yield self.web.ws()
        self.assertEqual(client.websocket_protocol_in_use, JSON)
        response = yield self.web.auth(client, "alice")
        self.assertEqual(response["kind"], "RESPONSE")
        self.assertEqual(response["seq"], 1)
        body = response["body"]
        self.assertIsInstance(body["heartbeatIntervalMs"], int)
        self.assertIsInstance(body["serverTimeMs"], str)
        self.assertEqual(body["maxFrameLength"], self.web.factory.settings.max_frame_length)
        before = int(time.time() * 1000)
        pong = yield client.call("ping", {})
        self.assertLessEqual(abs(int(pong["body"]["serverTimeMs"]) - before), 5000)
        [session] = [s for s in self.web.factory.connections if s.uid == "alice"]
        self.assertEqual(session.platform, pb.WEB)

    @inlineCallbacks
    def test_protoAuthAndPing(self):
        """
        On C{imserver.v1.proto}, one binary message is one C{Frame}, the
        bytes that follow the length prefix on TCP.
        """
        client = yield self.web.ws(protocol=PROTO)
        self.assertEqual(client.websocket_protocol_in_use, PROTO)
        response = yield self.web.auth(client, "alice")
        auth = pb.AuthResponse.FromString(response.body)
        self.assertEqual(auth.max_frame_length, self.web.factory.settings.max_frame_length)
        pong = yield client.call("ping", pb.PingRequest())
        self.assertGreater(pb.PingResponse.FromString(pong.body).server_time_ms, 0)

    @inlineCallbacks
    def test_jsonToTCPAndBack(self):
        """
        A browser (JSON) and a TCP client exchange messages both ways; each
        side also gets its own message in its inbox (outgoing).
        """
        browser = yield self.web.ws("alice")
        phone = yield self.web.tcp("bob")
        sent = yield browser.call(
            "send",
            {"to": "bob", "clientMsgId": "m1", "body": b64(b"hi bob"), "contentType": "text/plain"},
        )
        self.assertEqual(sent["body"]["seq"], "1")
        yield waitFor(lambda: phone.pushed)
        [(name, entry)] = phone.pushed
        self.assertEqual(
            (name, entry.message.body, entry.message.sender), ("message", b"hi bob", "alice")
        )
        own = yield browser.nextNotify("message")
        self.assertEqual(own["body"]["seq"], "1")
        self.assertIs(own["body"]["outgoing"], True)
        self.assertEqual(own["body"]["message"]["clientMsgId"], "m1")
        yield phone.send("alice", b"hi alice", "m2", "text/plain")
        push = yield browser.nextNotify("message")
        body = push["body"]
        self.assertEqual(body["seq"], "2")
        self.assertNotIn("outgoing", body)
        self.assertEqual(base64.b64decode(body["message"]["body"]), b"hi alice")
        self.assertEqual(body["message"]["sender"], "bob")

    @inlineCallbacks
    def test_jsonNoEcho(self):
        """
        A browser that asks for C{noEcho} (JSON names of C{no_echo}) is
        answered C{echoSkipped} and not pushed its own message; the next
        push it gets is its peer's reply.
        """
        browser = yield self.web.ws()
        auth = yield browser.call(
            "auth",
            {
                "uid": "alice",
                "token": self.web.token("alice"),
                "deviceId": "browser",
                "platform": "WEB",
                "noEcho": True,
            },
        )
        self.assertIs(auth["body"]["noEcho"], True)
        phone = yield self.web.tcp("bob")
        sent = yield browser.call("send", {"to": "bob", "clientMsgId": "m1", "body": b64(b"hi")})
        self.assertEqual((sent["body"]["seq"], sent["body"]["echoSkipped"]), ("1", True))
        yield phone.send("alice", b"hi alice", "m2")
        push = yield browser.nextNotify("message")
        self.assertEqual((push["body"]["seq"], push["body"]["message"]["sender"]), ("2", "bob"))

    @inlineCallbacks
    def test_protoToTCPAndBack(self):
        """
        The same over C{imserver.v1.proto}.
        """
        browser = yield self.web.ws("alice", protocol=PROTO)
        phone = yield self.web.tcp("bob")
        browser.call("send", pb.SendRequest(to="bob", client_msg_id="m1", body=b"x"))
        yield waitFor(lambda: phone.pushed)
        self.assertEqual(phone.pushed[0][1].message.body, b"x")
        yield phone.send("alice", b"y", "m2")
        pushes = []
        while len(pushes) < 2:
            push = yield browser.nextNotify("message")
            pushes.append(pb.InboxEntry.FromString(push.body))
        self.assertEqual(
            [(e.seq, e.outgoing, e.message.body) for e in pushes],
            [(1, True, b"x"), (2, False, b"y")],
        )

    @inlineCallbacks
    def test_group(self):
        """
        A group message from a browser reaches a TCP member, and one from
        the TCP member reaches the browser.
        """
        now = int(time.time() * 1000)
        groups = self.web.factory.groups
        yield groups.create("g1", "Group", "alice", now)
        yield groups.setMembers("g1", [("bob", pb.ROLE_MEMBER)], now)
        browser = yield self.web.ws("alice")
        phone = yield self.web.tcp("bob")
        listed = yield browser.call("groups", {})
        self.assertEqual([g["groupId"] for g in listed["body"]["groups"]], ["g1"])
        yield browser.call("send", {"groupId": "g1", "clientMsgId": "g-1", "body": b64(b"to all")})
        yield waitFor(lambda: phone.pushed)
        self.assertEqual(phone.pushed[0][1].message.group_id, "g1")
        yield phone.send("", b"back", "g-2", groupId="g1")
        while True:
            push = yield browser.nextNotify("message")
            if push["body"]["message"]["clientMsgId"] == "g-2":
                break
        self.assertEqual(push["body"]["message"]["groupId"], "g1")

    @inlineCallbacks
    def test_resumeAfterDrop(self):
        """
        A browser that drops its connection and comes back with the last
        seq it acknowledged gets what it missed, in order, nothing twice.
        """
        phone = yield self.web.tcp("bob")
        browser = yield self.web.ws("alice")
        for i in range(3):
            yield phone.send("alice", str(i).encode(), "a{}".format(i))
        seqs = []
        for _ in range(3):
            push = yield browser.nextNotify("message")
            seqs.append(int(push["body"]["seq"]))
        self.assertEqual(seqs, [1, 2, 3])
        browser.notify("ack", {"seq": "2"})
        yield waitFor(lambda: self.web.factory._dirtyCursors or True)
        browser.dropConnection(abort=True)
        yield browser.closed
        for i in range(3, 5):
            yield phone.send("alice", str(i).encode(), "a{}".format(i))
        again = yield self.web.ws("alice", lastSeq=2)
        bodies = []
        for _ in range(3):
            push = yield again.nextNotify("message")
            bodies.append(
                (int(push["body"]["seq"]), base64.b64decode(push["body"]["message"]["body"]))
            )
        self.assertEqual(bodies, [(3, b"2"), (4, b"3"), (5, b"4")])
        yield self.assertNoMore(again, "message")

    def assertNoMore(self, client, method):
        """
        Nothing more of C{method} arrives: a ping's answer comes first.
        """
        d = client.call("ping", {} if client.json else pb.PingRequest())

        def check(_):
            self.assertEqual(
                [item for item in client.received if client.methodOf(item) == method], []
            )

        return d.addCallback(check)

    @inlineCallbacks
    def test_kickAcrossTransports(self):
        """
        One device signing in over WebSocket replaces its TCP session
        (C{kicked} REPLACED), and the reverse; a kicked WebSocket is closed
        with 1000.
        """
        phone = yield self.web.tcp("alice", device="d1")
        browser = yield self.web.ws("alice", device="d1")
        yield phone.whenClosed()
        self.assertEqual(phone.kicked.reason, pb.REPLACED)
        yield self.web.tcp("alice", device="d1")
        kicked = yield browser.nextNotify("kicked")
        self.assertEqual(kicked["body"]["reason"], "REPLACED")
        code = yield browser.closed
        self.assertEqual(code, 1000)

    @inlineCallbacks
    def test_typing(self):
        """
        Typing signals go from a browser to a TCP client.
        """
        browser = yield self.web.ws("alice")
        phone = yield self.web.tcp("bob")
        browser.notify("typing", {"uid": "bob", "active": True})
        yield waitFor(lambda: phone.pushed)
        name, typing = phone.pushed[0]
        self.assertEqual((name, typing.uid, typing.active), ("typing", "alice", True))

    @inlineCallbacks
    def test_notice(self):
        """
        A broadcast notice reaches WebSocket sessions of both subprotocols.
        """
        browser = yield self.web.ws("alice")
        binary = yield self.web.ws("bob", protocol=PROTO)
        self.assertEqual(self.web.factory.broadcast(b"maintenance at 5", "text/plain"), 2)
        notice = yield browser.nextNotify("notice")
        self.assertEqual(base64.b64decode(notice["body"]["body"]), b"maintenance at 5")
        self.assertEqual(notice["body"]["contentType"], "text/plain")
        notice = yield binary.nextNotify("notice")
        self.assertEqual(pb.Notice.FromString(notice.body).body, b"maintenance at 5")

    @inlineCallbacks
    def test_shutdown(self):
        """
        Stopping the gate sends SERVER_SHUTDOWN and closes with 4006.
        """
        browser = yield self.web.ws("alice")
        self.web.root.stopService()
        error = yield browser.nextError()
        self.assertEqual(error["error"]["code"], "SERVER_SHUTDOWN")
        code = yield browser.closed
        self.assertEqual(code, CLOSE_ERROR_BASE + pb.SERVER_SHUTDOWN)

    @inlineCallbacks
    def test_noDelay(self):
        """
        The gate's end of a WebSocket connection has Nagle's algorithm off
        (C{TCP_NODELAY}), as its TCP connections do.
        """
        yield self.web.ws("alice")
        [session] = self.web.factory.connections
        sock = socketTransport(session.channel.transport).getHandle()
        self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @inlineCallbacks
    def test_compact(self):
        """
        An open connection's protocol keeps a small instance dictionary
        (autobahn's defaults and the factory's options are read from the
        class), and a connection made so still works and closes.
        """
        browser = yield self.web.ws("alice")
        [session] = self.web.factory.connections
        state = vars(session.channel)
        self.assertLess(len(state), 50, sorted(state))
        self.assertNotIn("http_headers", state)
        self.assertNotIn("versions", state)
        self.assertEqual(session.channel.versions, [13])
        yield browser.call("ping", {})
        yield self.web.closeWS(browser)

    @inlineCallbacks
    def test_countedAsConnections(self):
        """
        WebSocket sessions are the gate's connections: in its set while
        open, out of it once closed.
        """
        browser = yield self.web.ws("alice")
        self.assertEqual([s.uid for s in self.web.factory.connections], ["alice"])
        self.assertEqual(len(self.web.site.http), 0)
        yield self.web.closeWS(browser)
        yield waitFor(lambda: not self.web.factory.connections and not self.web.factory.closing)


class RudeWebSocket(RawClient):
    """
    The raw TLS client of L{tests.test_closing} (never answers
    C{close_notify}) keeping the bytes it reads: it answers no WebSocket
    close either.
    """

    raw = b""

    def _received(self, data):
        self.raw += data
        self._wake()


class SecureWebSocketTests(TestCase):
    """
    C{--web ssl:...}: wss:// with the gate's certificate.
    """

    timeout = 30

    @inlineCallbacks
    def test_wss(self):
        """
        A wss:// client that trusts the gate's certificate exchanges
        messages with a TCP client; its close is bounded like the TLS
        gate's.
        """
        web = WebGate(self, "--web", "ssl:0:interface=127.0.0.1")
        yield web.ports()
        caFile = web.dataDir.child(CERT_FILE_NAME).path
        browser = yield connectWS(web.webPort, [PROTO], host="localhost", caFile=caFile)
        self.addCleanup(web.closeWS, browser)
        self.assertTrue(browser.transport.getHandle() is not None)
        response = yield web.auth(browser, "alice")
        self.assertFalse(response.HasField("error"))
        phone = yield web.tcp("bob")
        yield phone.send("alice", b"over wss", "s1")
        push = yield browser.nextNotify("message")
        self.assertEqual(pb.InboxEntry.FromString(push.body).message.body, b"over wss")
        self.assertIn(web.gate.web.port.getHost().port, [web.webPort])

    @inlineCallbacks
    def test_certificateReload(self):
        """
        The web listener's certificate is reloaded with the gate's: after
        the files are replaced and reloaded, a new wss:// connection gets
        the new certificate.
        """
        web = WebGate(self, "--web", "ssl:0:interface=127.0.0.1")
        yield web.ports()
        certPEM, keyPEM = makeSelfSigned(hostnames=("localhost", "renewed.example"))
        web.dataDir.child(KEY_FILE_NAME).setContent(keyPEM)
        web.dataDir.child(CERT_FILE_NAME).setContent(certPEM)
        self.assertEqual(web.root.getServiceNamed("certificates").reload(), 1)
        newCA = FilePath(self.mktemp())
        newCA.setContent(certPEM)
        browser = yield connectWS(web.webPort, [JSON], host="localhost", caFile=newCA.path)
        self.addCleanup(web.closeWS, browser)
        response = yield web.auth(browser, "alice")
        self.assertNotIn("error", response)

    @inlineCallbacks
    def test_rudeClientCutOff(self):
        """
        A wss:// client that answers neither the gate's WebSocket close nor
        its TLS C{close_notify}, and never closes its socket, is cut off
        within C{close_timeout} of the close (1 s here); its session ends at
        once.
        """
        web = WebGate(
            self,
            "--web",
            "ssl:0:interface=127.0.0.1",
            "--auth-timeout",
            "0.2",
            "--close-timeout",
            "1",
        )
        yield web.ports()
        context = stdlib_ssl.create_default_context(cafile=web.dataDir.child(CERT_FILE_NAME).path)
        client = RudeWebSocket(context, keepOpen=True)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", web.webPort), client)
        yield client.until(lambda: client.handshaken, "the TLS handshake")
        client.send(upgradeRequest(protocols=(PROTO,)))
        yield client.until(lambda: b"\r\n\r\n" in client.raw, "the 101")
        # The gate's close frame (AUTH_TIMEOUT, 4004) after the ERROR frame.
        closeCode = (CLOSE_ERROR_BASE + pb.AUTH_TIMEOUT).to_bytes(2, "big")
        yield client.until(lambda: b"\x88" in client.raw and closeCode in client.raw, "a close")
        closed = reactor.seconds()
        self.assertEqual(web.factory.connections, set())
        yield client.until(lambda: client.reason is not None, "the gate to end the connection")
        self.assertLess(reactor.seconds() - closed, 2)
        yield waitFor(lambda: not web.factory.closing)

    @inlineCallbacks
    def test_plainOnTLS(self):
        """
        A plaintext upgrade request on the TLS listener gets no answer but
        a close.
        """
        web = WebGate(self, "--web", "ssl:0:interface=127.0.0.1")
        yield web.ports()
        _, data = yield rawHTTP(web.webPort, upgradeRequest())
        self.assertNotIn(b"HTTP/1.1 101", data)
        self.assertEqual(len(web.factory.connections), 0)


class SlowConsumerTests(TestCase):
    """
    A browser that stops reading is paused, then closed like a TCP client.
    """

    timeout = 30

    @inlineCallbacks
    def test_slowConsumer(self):
        web = WebGate(
            self,
            "--write-buffer-high",
            "4096",
            "--slow-consumer-grace",
            "0.5",
            "--sweep-interval",
            "0.05",
        )
        yield web.ports()
        browser = yield web.ws("alice")
        other = yield web.ws("bob")
        browser.transport.pauseProducing()
        self.addCleanup(browser.transport.resumeProducing)
        [session] = [s for s in web.factory.connections if s.uid == "alice"]
        notice = b"n" * 60000
        # Pushed to until the socket buffers (several MB on loopback) are
        # full, it stays paused for the grace and is closed; broadcast skips
        # it while it is paused.  3000 rounds, 180 MB, at most.
        paused = 0
        for _ in range(3000):
            if session not in web.factory.connections:
                break
            paused += session.pausedSince is not None
            web.factory.broadcast(notice, "text/plain")
            yield deferLater(reactor, 0.001, lambda: None)
        self.assertGreater(paused, 0)
        self.assertNotIn(session, web.factory.connections)
        self.assertEqual(session.errorCode, pb.SLOW_CONSUMER)
        # The other session is unaffected.
        yield other.call("ping", {})
        browser.transport.resumeProducing()
        yield browser.closed


class IdleTests(TestCase):
    """
    The idle sweep over WebSocket.
    """

    timeout = 30

    @inlineCallbacks
    def test_pingFramesAndIdle(self):
        """
        WebSocket ping frames count as activity; once nothing comes for
        C{idle_timeout}, the session is closed with IDLE_TIMEOUT and 4005.
        """
        web = WebGate(
            self,
            "--heartbeat-interval",
            "0.1",
            "--idle-timeout",
            "0.5",
            "--sweep-interval",
            "0.05",
        )
        yield web.ports()
        browser = yield web.ws("alice")
        [session] = web.factory.connections
        loop = LoopingCall(browser.sendPing)
        loop.clock = reactor
        loop.start(0.1)
        try:
            started = reactor.seconds()
            yield waitFor(lambda: reactor.seconds() - started > 1.2, timeout=3)
            self.assertIn(session, web.factory.connections)
        finally:
            loop.stop()
        error = yield browser.nextError()
        self.assertEqual(error["error"]["code"], "IDLE_TIMEOUT")
        code = yield browser.closed
        self.assertEqual(code, CLOSE_ERROR_BASE + pb.IDLE_TIMEOUT)


class WebSocketErrorTests(TestCase):
    """
    Bad input over WebSocket gets the documented ERROR frame and close code,
    never a crash, and does not affect another session.
    """

    timeout = 30

    @inlineCallbacks
    def setUp(self):
        self.web = WebGate(self, "--auth-timeout", "2", "--preauth-max-frame-length", "256")
        yield self.web.ports()
        self.bystander = yield self.web.ws("carol")

    @inlineCallbacks
    def assertClosedWith(self, client, code):
        """
        C{client} gets an ERROR frame with C{code} and a close with 4000 +
        C{code}; the other session is unaffected.
        """
        error = yield client.nextError()
        name = error["error"]["code"] if client.json else pb.ErrorCode.Name(error.error.code)
        self.assertEqual(name, pb.ErrorCode.Name(code))
        closeCode = yield client.closed
        self.assertEqual(closeCode, CLOSE_ERROR_BASE + code)
        yield self.bystander.call("ping", {})

    @inlineCallbacks
    def test_textOnProto(self):
        client = yield self.web.ws(protocol=PROTO)
        client.sendMessage(b'{"kind":"REQUEST"}', False)
        yield self.assertClosedWith(client, pb.BAD_FRAME)

    @inlineCallbacks
    def test_binaryOnJSON(self):
        client = yield self.web.ws()
        client.sendMessage(
            pb.Frame(kind=pb.REQUEST, seq=1, method="ping").SerializeToString(), True
        )
        yield self.assertClosedWith(client, pb.BAD_FRAME)

    @inlineCallbacks
    def test_notJSON(self):
        client = yield self.web.ws()
        client.sendMessage(b"{kind: REQUEST", False)
        yield self.assertClosedWith(client, pb.BAD_FRAME)

    @inlineCallbacks
    def test_notAnObject(self):
        client = yield self.web.ws()
        client.sendMessage(b"[1, 2]", False)
        yield self.assertClosedWith(client, pb.BAD_FRAME)

    @inlineCallbacks
    def test_unknownField(self):
        client = yield self.web.ws("alice")
        client.sendMessage(
            json.dumps(
                {"kind": "REQUEST", "seq": 5, "method": "ping", "body": {"bogus": 1}}
            ).encode(),
            False,
        )
        yield self.assertClosedWith(client, pb.BAD_FRAME)

    @inlineCallbacks
    def test_wrongType(self):
        client = yield self.web.ws("alice")
        client.sendMessage(
            json.dumps(
                {"kind": "REQUEST", "seq": 5, "method": "send", "body": {"to": ["bob"]}}
            ).encode(),
            False,
        )
        yield self.assertClosedWith(client, pb.BAD_FRAME)

    @inlineCallbacks
    def test_frameFieldWrongType(self):
        client = yield self.web.ws()
        client.sendMessage(b'{"kind": "REQUEST", "seq": "x", "method": "ping"}', False)
        yield self.assertClosedWith(client, pb.BAD_FRAME)

    @inlineCallbacks
    def test_badUTF8(self):
        """
        A text message that is not UTF-8 fails the connection with 1007
        (RFC 6455, section 8.1).
        """
        client = yield self.web.ws()
        client.sendMessage(b'{"kind": "\xff\xfe"}', False)
        code = yield client.closed
        self.assertEqual(code, 1007)

    @inlineCallbacks
    def test_emptyBinary(self):
        client = yield self.web.ws(protocol=PROTO)
        client.sendMessage(b"", True)
        yield self.assertClosedWith(client, pb.EMPTY_FRAME)

    @inlineCallbacks
    def test_protoDoesNotParse(self):
        client = yield self.web.ws(protocol=PROTO)
        client.sendMessage(b"\xff\xff\xff", True)
        yield self.assertClosedWith(client, pb.BAD_FRAME)

    @inlineCallbacks
    def test_oversizeBeforeAuth(self):
        """
        Before auth a message above C{preauth_max_frame_length} is
        FRAME_TOO_LARGE, refused from its header on.
        """
        client = yield self.web.ws(protocol=PROTO)
        client.sendMessage(b"\x08" * 257, True)
        yield self.assertClosedWith(client, pb.FRAME_TOO_LARGE)

    @inlineCallbacks
    def test_oversizeFragmented(self):
        """
        A message sent in many small fragments is held to the limit as a
        whole.
        """
        client = yield self.web.ws(protocol=PROTO)
        client.sendMessage(b"\x08" * 2000, True, fragmentSize=16)
        yield self.assertClosedWith(client, pb.FRAME_TOO_LARGE)

    @inlineCallbacks
    def test_jsonOversizeFrame(self):
        """
        On JSON the text may be longer than the limit (the JSON form is
        longer than the protobuf one), but the frame it encodes may not.
        """
        client = yield self.web.ws()
        token = "x" * 300
        client.sendMessage(
            json.dumps(
                {
                    "kind": "REQUEST",
                    "seq": 1,
                    "method": "auth",
                    "body": {"uid": "a", "token": token},
                }
            ).encode(),
            False,
        )
        yield self.assertClosedWith(client, pb.FRAME_TOO_LARGE)

    @inlineCallbacks
    def test_violationEndsSession(self):
        """
        A violation of RFC 6455 that autobahn answers itself (here a
        reserved opcode) ends the session at once, as any close the gate
        decides: out of the gate's connections, its close frame 1002
        written, TCP closed within C{close_timeout} though the client never
        answers; the gate carries on (its idle sweep included).
        """
        client = Collect(upgradeRequest(protocols=(PROTO,)))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.web.webPort), client)
        yield waitFor(lambda: b"\r\n\r\n" in b"".join(client.data))
        start = time.monotonic()
        client.transport.write(bytes.fromhex("83815ac30f9622"))
        yield withDeadline(client.done, 5, "the gate to close the connection")
        # close_timeout (2 s) at most.
        self.assertLess(time.monotonic() - start, 3)
        data = b"".join(client.data)
        self.assertIn(b"HTTP/1.1 101", data)
        # The close frame (FIN + opcode 8) with code 1002.
        self.assertIn(b"\x88", data)
        self.assertIn((1002).to_bytes(2, "big"), data.split(b"\r\n\r\n", 1)[1])
        self.assertEqual([s for s in self.web.factory.connections if s.uid is None], [])
        self.assertEqual(self.web.factory.closing, set())
        self.web.factory.sweep()
        yield self.bystander.call("ping", {})

    @inlineCallbacks
    def test_requestBeforeAuth(self):
        client = yield self.web.ws()
        response = yield client.call("ping", {})
        self.assertEqual(response["error"]["code"], "NOT_AUTHENTICATED")

    @inlineCallbacks
    def test_unknownMethod(self):
        """
        An unknown method is answered UNKNOWN_METHOD, its body unread.
        """
        client = yield self.web.ws("alice")
        response = yield client.call("nosuch", {"anything": [1]})
        self.assertEqual(response["error"]["code"], "UNKNOWN_METHOD")

    @inlineCallbacks
    def test_badToken(self):
        """
        A refused auth is AUTH_FAILED, then a close with 1000.
        """
        client = yield self.web.ws()
        response = yield self.web.auth(client, "alice", token="v1.1.bogus")
        self.assertEqual(response["error"]["code"], "AUTH_FAILED")
        code = yield client.closed
        self.assertEqual(code, 1000)

    @inlineCallbacks
    def test_authTimeout(self):
        client = yield self.web.ws()
        yield self.assertClosedWith(client, pb.AUTH_TIMEOUT)


class HandshakeTests(TestCase):
    """
    The HTTP side of the web listener: the page, the upgrade and what it
    refuses.
    """

    timeout = 30

    @inlineCallbacks
    def setUp(self):
        self.web = WebGate(
            self, "--web-origin", "https://app.example.com", "--web-request-timeout", "1"
        )
        yield self.web.ports()

    def status(self, data):
        return int(data.split(b" ", 2)[1])

    @inlineCallbacks
    def test_page(self):
        """
        C{/} is the chat page, C{/imserver.js} the client, with the security
        headers.
        """
        for path, mediaType in [(b"/", b"text/html"), (b"/imserver.js", b"text/javascript")]:
            _, data = yield rawHTTP(
                self.web.webPort,
                b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            )
            head, _, body = data.partition(b"\r\n\r\n")
            self.assertEqual(self.status(data), 200)
            self.assertIn(b"Content-Type: " + mediaType, head)
            self.assertIn(b"Content-Security-Policy: default-src 'self'", head)
            self.assertIn(b"X-Content-Type-Options: nosniff", head)
            self.assertTrue(body)

    @inlineCallbacks
    def test_notFound(self):
        _, data = yield rawHTTP(
            self.web.webPort, b"GET /secret HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(self.status(data), 404)

    @inlineCallbacks
    def test_noUpgrade(self):
        """
        A plain GET of C{/ws} is 426 Upgrade Required.
        """
        _, data = yield rawHTTP(
            self.web.webPort, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(self.status(data), 426)
        self.assertEqual(self.web.site.refusedUpgrades["not_websocket"], 1)

    @inlineCallbacks
    def test_noSubprotocol(self):
        """
        An upgrade that offers none of the subprotocols is refused with 400
        and says which to offer.
        """
        for offered in [(), ("chat",)]:
            _, data = yield rawHTTP(self.web.webPort, upgradeRequest(protocols=offered))
            self.assertEqual(self.status(data), 400)
            self.assertIn(b"imserver.v1.json", data)
        self.assertEqual(self.web.site.refusedUpgrades["subprotocol"], 2)

    @inlineCallbacks
    def test_foreignOrigin(self):
        """
        A page of another site cannot open a WebSocket (403).
        """
        _, data = yield rawHTTP(
            self.web.webPort, upgradeRequest(origin=b"https://evil.example.net")
        )
        self.assertEqual(self.status(data), 403)
        self.assertEqual(self.web.site.refusedUpgrades["origin"], 1)
        self.assertEqual(len(self.web.factory.connections), 0)

    @inlineCallbacks
    def test_allowedOrigins(self):
        """
        The page's own origin, loopback and the C{--web-origin} ones are
        taken, as is a client without an Origin (not a browser).
        """
        own = "http://127.0.0.1:{}".format(self.web.webPort)
        for origin in [own, "http://localhost:3000", "https://app.example.com", None]:
            client = yield self.web.ws(origin=origin)
            self.assertEqual(client.websocket_protocol_in_use, JSON)
            yield self.web.closeWS(client)

    @inlineCallbacks
    def test_compressionOffered(self):
        """
        An upgrade offering permessage-deflate, as every browser's does, is
        taken without it.
        """
        offer = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        client = Collect(upgradeRequest(extra=offer, origin=b"http://127.0.0.1"))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.web.webPort), client)
        yield waitFor(lambda: b"\r\n\r\n" in b"".join(client.data))
        head = b"".join(client.data).split(b"\r\n\r\n")[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertIn(b"Sec-WebSocket-Protocol: imserver.v1.json", head)
        self.assertNotIn(b"Sec-WebSocket-Extensions", head)
        client.transport.loseConnection()
        yield client.done

    @inlineCallbacks
    def test_headersTooLarge(self):
        """
        A request whose headers exceed C{web_max_request_size} is refused.
        """
        extra = b"X-Filler: " + b"a" * 9000 + b"\r\n"
        _, data = yield rawHTTP(self.web.webPort, upgradeRequest(extra=extra))
        self.assertIn(self.status(data), (400, 431))
        self.assertEqual(len(self.web.factory.connections), 0)

    @inlineCallbacks
    def test_deadline(self):
        """
        A connection that never completes a request is closed at
        C{web_request_timeout} (1 s here), even if it keeps trickling
        header lines.
        """
        yield rawHTTP(self.web.webPort, b"GET /ws HTTP/1.1\r\nHost: x\r\n", timeout=5)
        self.assertEqual(len(self.web.site.http), 0)
        slow = Collect(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.web.webPort), slow)
        started = time.monotonic()
        loop = LoopingCall(slow.transport.write, b"X-A: b\r\n")
        loop.start(0.1)
        try:
            yield withDeadline(slow.done, 5, "the trickling connection to be closed")
        finally:
            loop.stop()
        self.assertLess(time.monotonic() - started, 4)

    @inlineCallbacks
    def test_stopDropsHTTP(self):
        """
        Stopping the gate drops the web listener's connections still in
        HTTP at once.
        """
        pending = Collect(b"GET / HTTP/1.1\r\n")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.web.webPort), pending)
        yield waitFor(lambda: len(self.web.site.http) == 1)
        yield self.web.root.stopService()
        yield withDeadline(pending.done, 1, "the HTTP connection to be dropped")
        self.assertEqual(len(self.web.site.http), 0)

    @inlineCallbacks
    def test_admission(self):
        """
        Connections still in HTTP count against C{max_connections_per_ip}
        before the upgrade, with the WebSocket sessions.
        """
        web = WebGate(self, "--max-connections-per-ip", "2")
        yield web.ports()
        first = yield web.ws("alice")
        pending = Collect(b"")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", web.webPort), pending)
        yield waitFor(lambda: len(web.site.http) == 1)
        refused = Collect(b"")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", web.webPort), refused)
        yield withDeadline(refused.done, 5, "the refused connection to be closed")
        self.assertEqual(web.factory.metrics.connectionsRefused["max_connections_per_ip"], 1)
        pending.transport.loseConnection()
        yield pending.done
        yield waitFor(lambda: not web.site.http)
        yield first.call("ping", {})
