# -*- test-case-name: tests.test_authorization -*-
"""
Authorization: who may do what, as docs/security.md sets it out.

  - The sender of a message is always the authenticated uid: no payload can
    claim another (L{SenderTests}).
  - Only members send to, list, leave or type in a group; a refused send
    stores nothing (L{GroupTests}).
  - Only a token signed with the gate's secret, for the uid of the auth,
    not expired, authenticates; every refusal looks the same
    (L{TokenTests}).
  - The HTTP API is not reachable through a client listener (plain or
    TLS), nor the client protocol through the API port
    (L{ListenerSeparationTests}).
  - No token, secret or admin token ever reaches a log line
    (L{LogSecrecyTests}).

The first three run on L{StringTransport} and L{Clock}; the last two on a
real gate started in this process on loopback.
"""

import json
import time
from io import BytesIO

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from imserver import logs, tap
from imserver.api import loadAdminToken
from imserver.auth import loadSecret, mintToken
from imserver.client import connect
from imserver.datadir import CERT_FILE_NAME
from imserver.errors import RemoteError
from imserver.framing import encodeFrame
from imserver.pb import im_pb2 as pb

from tests.support import serverEnvironment, startServer, withoutSecretEnvironment
from tests.support.frames import readFrames, written
from tests.support.gate import SECRET, DeliveryHarness, pushes, responses

#: A secret that is not the gate's.
OTHER_SECRET = b"another-secret-another-secret-00"


def _field(number, value):
    """
    An extra length-delimited protobuf field (tag, length, bytes).
    """
    return bytes([number << 3 | 2, len(value)]) + value


class SenderTests(SynchronousTestCase):
    """
    The sender is the authenticated uid, whatever the payload says.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self)
        self.alice, self.aliceT, _, _ = self.gate.login("alice")
        self.bob, self.bobT, _, _ = self.gate.login("bob")

    def sendRaw(self, body, seq=7, frameExtra=b""):
        frame = pb.Frame(kind=pb.REQUEST, seq=seq, method="send", body=body)
        data = frame.SerializeToString() + frameExtra
        self.alice.dataReceived(len(data).to_bytes(4, "big") + data)

    def assertSentByAlice(self, clientMsgId):
        [response] = responses(written(self.aliceT))
        self.assertFalse(response.HasField("error"), response.error)
        [entry] = pushes(written(self.bobT))
        self.assertEqual(
            (entry.message.sender, entry.message.client_msg_id), ("alice", clientMsgId)
        )
        [stored] = self.successResultOf(self.gate.store.fetch("bob", entry.seq - 1, 1))
        self.assertEqual(stored.message.sender, "alice")
        return entry

    def test_unknownFieldsNamingASender(self):
        """
        Fields the request does not have, holding another uid (where a
        C{Message} keeps its sender, and others), change nothing.
        """
        request = pb.SendRequest(to="bob", client_msg_id="m1", body=b"hi")
        self.sendRaw(
            request.SerializeToString()
            + _field(6, b"mallory")
            + _field(7, b"mallory")
            + _field(15, b"sender=mallory")
        )
        self.assertSentByAlice("m1")

    def test_messageInBody(self):
        """
        A body that is a serialized C{Message} claiming another sender is
        stored and delivered as an opaque body from alice.
        """
        forged = pb.Message(id=1, sender="mallory", recipient="bob", body=b"trust me")
        request = pb.SendRequest(to="bob", client_msg_id="m2", body=forged.SerializeToString())
        self.sendRaw(request.SerializeToString())
        entry = self.assertSentByAlice("m2")
        self.assertEqual(entry.message.body, forged.SerializeToString())

    def test_frameFields(self):
        """
        Unknown fields in the frame itself (a forged C{error} or a sender
        field) do not make the message come from anyone else.
        """
        request = pb.SendRequest(to="bob", client_msg_id="m3", body=b"x")
        self.sendRaw(request.SerializeToString(), frameExtra=_field(6, b"mallory"))
        self.assertSentByAlice("m3")

    def test_systemSenderCannotBeClaimed(self):
        """
        The system sender is the empty uid; a client cannot send as it
        (nor authenticate as it).
        """
        protocol, transport = self.gate.connect()
        self.gate.request(
            protocol, "auth", pb.AuthRequest(uid="", device_id="d", token=self.gate.token("alice"))
        )
        [frame] = written(transport)
        self.assertEqual(frame.error.code, pb.BAD_REQUEST)
        self.test_unknownFieldsNamingASender()

    def test_typing(self):
        """
        A typing signal names the peer it is for; the peer sees the
        authenticated sender.
        """
        self.gate.notify(self.alice, "typing", pb.Typing(uid="bob", active=True))
        [frame] = written(self.bobT)
        self.assertEqual(pb.Typing.FromString(frame.body).uid, "alice")


class GroupTests(SynchronousTestCase):
    """
    Only members use a group over the client protocol.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self)
        groups = self.gate.factory.groups
        now = int(self.gate.clock.seconds() * 1000)
        self.successResultOf(groups.create("team", "Team", "bob", now))
        self.successResultOf(groups.setMembers("team", [("carol", pb.ROLE_MEMBER)], now))
        self.alice, self.aliceT, _, _ = self.gate.login("alice")
        self.bob, self.bobT, _, _ = self.gate.login("bob")
        self.carol, self.carolT, _, _ = self.gate.login("carol")

    def heads(self):
        return [
            self.successResultOf(self.gate.store.head(uid)) for uid in ("alice", "bob", "carol")
        ]

    def sendToGroup(self, groupId, clientMsgId="g1"):
        self.gate.request(
            self.alice,
            "send",
            pb.SendRequest(group_id=groupId, client_msg_id=clientMsgId, body=b"let me in"),
            seq=9,
        )
        [response] = responses(written(self.aliceT))
        return response

    def test_nonMemberSend(self):
        """
        A non-member's group send gets C{NOT_MEMBER}: nothing is stored in
        any inbox, nothing is pushed, the connection stays, and the
        C{client_msg_id} is not used up.
        """
        response = self.sendToGroup("team")
        self.assertEqual(response.error.code, pb.NOT_MEMBER)
        self.assertEqual(self.heads(), [0, 0, 0])
        self.assertEqual(written(self.bobT) + written(self.carolT), [])
        self.assertFalse(self.aliceT.disconnecting)
        now = int(self.gate.clock.seconds() * 1000)
        self.successResultOf(
            self.gate.factory.groups.setMembers("team", [("alice", pb.ROLE_MEMBER)], now)
        )
        response = self.sendToGroup("team")
        self.assertFalse(pb.SendResponse.FromString(response.body).duplicate)
        self.assertEqual(self.heads(), [1, 1, 1])

    def test_noSuchGroup(self):
        """
        A group that does not exist gets the same answer as one the user
        is not in.
        """
        response = self.sendToGroup("nowhere")
        self.assertEqual(response.error.code, pb.NOT_MEMBER)
        self.assertEqual(self.heads(), [0, 0, 0])

    def test_afterRemoval(self):
        """
        A member removed from the group can send no more.
        """
        now = int(self.gate.clock.seconds() * 1000)
        groups = self.gate.factory.groups
        self.successResultOf(groups.setMembers("team", [("alice", pb.ROLE_MEMBER)], now))
        self.successResultOf(groups.removeMembers("team", ["alice"]))
        self.assertEqual(self.sendToGroup("team").error.code, pb.NOT_MEMBER)
        self.assertEqual(self.heads(), [0, 0, 0])

    def test_membersAndLeave(self):
        """
        A non-member can neither list the members nor leave.
        """
        for method, request in [
            ("members", pb.MembersRequest(group_id="team")),
            ("leave", pb.LeaveRequest(group_id="team")),
        ]:
            self.gate.request(self.alice, method, request, seq=4)
            [response] = responses(written(self.aliceT))
            self.assertEqual(response.error.code, pb.NOT_MEMBER, method)
        members = self.successResultOf(self.gate.factory.groups.members("team"))
        self.assertEqual(sorted(m.uid for m in members), ["bob", "carol"])

    def test_groupsListsOwnOnly(self):
        """
        C{groups} lists the caller's groups only.
        """
        self.gate.request(self.alice, "groups", pb.GroupsRequest(), seq=4)
        [response] = responses(written(self.aliceT))
        self.assertEqual(list(pb.GroupsResponse.FromString(response.body).groups), [])

    def test_typing(self):
        """
        A non-member's typing signal in a group reaches nobody.
        """
        self.gate.notify(self.alice, "typing", pb.Typing(group_id="team", active=True))
        self.assertEqual(written(self.bobT) + written(self.carolT), [])


class TokenTests(SynchronousTestCase):
    """
    Which tokens authenticate; every refusal looks the same and closes.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self)

    def auth(self, token, uid="alice"):
        protocol, transport = self.gate.connect()
        self.gate.request(protocol, "auth", pb.AuthRequest(uid=uid, device_id="phone", token=token))
        [frame] = written(transport)
        return protocol, transport, frame

    def assertRefused(self, token, uid="alice"):
        protocol, transport, frame = self.auth(token, uid)
        self.assertEqual((frame.kind, frame.seq), (pb.RESPONSE, 1))
        self.assertEqual(
            (frame.error.code, frame.error.message), (pb.AUTH_FAILED, "authentication failed")
        )
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(protocol.session.uid)
        sessions = self.successResultOf(self.gate.registry.sessionsFor(uid))
        self.assertNotIn(protocol.session, sessions)

    def test_valid(self):
        """
        The control: a fresh token for the uid, signed with the secret.
        """
        protocol, transport, frame = self.auth(self.gate.token("alice"))
        self.assertFalse(frame.HasField("error"))
        self.assertEqual(protocol.session.uid, "alice")

    def test_expired(self):
        """
        A token is refused once its expiry has passed, and at the expiry
        itself; one second before, it is accepted.
        """
        token = self.gate.token("alice", ttl=60)
        self.gate.clock.advance(59)
        protocol, transport, frame = self.auth(token)
        self.assertFalse(frame.HasField("error"))
        self.gate.clock.advance(1)
        self.assertRefused(token)
        self.gate.clock.advance(3600)
        self.assertRefused(token)

    def test_otherUid(self):
        """
        A token minted for bob does not authenticate alice, nor an empty
        or different-case uid.
        """
        token = self.gate.token("bob")
        self.assertRefused(token, "alice")
        self.assertRefused(token, "Bob")
        self.assertRefused(token, "bob ")

    def test_otherSecret(self):
        """
        A token signed with another secret is refused.
        """
        self.assertRefused(mintToken(OTHER_SECRET, "alice", 3600, self.gate.clock.seconds()))

    def test_tampered(self):
        """
        A valid token with its expiry raised, or a signature of another
        token, is refused.
        """
        now = self.gate.clock.seconds()
        version, expiry, signature = self.gate.token("alice").split(".")
        self.assertRefused(".".join([version, str(int(expiry) + 3600), signature]))
        other = mintToken(SECRET, "bob", 3600, now).split(".")[2]
        self.assertRefused(".".join([version, expiry, other]))
        self.assertRefused(".".join([version, expiry, signature[:-1]]))
        self.assertRefused(".".join(["v2", expiry, signature]))

    def test_adminTokenIsNoClientToken(self):
        """
        The HTTP API's admin token (64 hex characters) is no client token,
        nor is the secret itself.
        """
        self.assertRefused("ab" * 32)
        self.assertRefused(SECRET.decode("ascii"))


class RawClient(Protocol):
    """
    Writes bytes and collects what comes back until the connection closes.
    """

    def __init__(self):
        self.data = b""
        self.closed = Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.closed.callback(self.data)


class LiveGateTestCase(TestCase):
    """
    A gate with a plain and a TLS client listener and its HTTP API, in this
    process on loopback (the default SQLite store).
    """

    timeout = 30

    @inlineCallbacks
    def setUp(self):
        withoutSecretEnvironment(self)
        self.dataDir = FilePath(self.mktemp())
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.dataDir.path,
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--listen",
                "ssl:0:interface=127.0.0.1",
                "--api",
                "tcp:0:interface=127.0.0.1",
            ]
        )
        self.root = startServer(self, options)
        self.gate = self.root.getServiceNamed("gate")
        self.factory = self.gate.factory
        tcpAddress, sslAddress = yield self.gate.addresses()
        self.tcpPort, self.sslPort = tcpAddress.port, sslAddress.port
        port = yield self.root.getServiceNamed("api").whenListening()
        self.apiPort = port.getHost().port
        self.caFile = self.dataDir.child(CERT_FILE_NAME).path
        self.secret = loadSecret(self.dataDir, environ=serverEnvironment())
        self.adminToken = loadAdminToken(self.dataDir)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    @inlineCallbacks
    def api(self, method, path, body=None, token=None, headers=()):
        """
        Call the HTTP API (with the admin token unless C{token} is given).

        @return: a L{Deferred} firing with C{(status, parsed body)}.
        """
        headers = Headers(
            dict(
                [(b"Authorization", [b"Bearer " + (token or self.adminToken)])]
                + [(name, [value]) for name, value in headers]
            )
        )
        producer = None
        if body is not None:
            headers.addRawHeader(b"Content-Type", b"application/json")
            producer = FileBodyProducer(BytesIO(json.dumps(body).encode("utf-8")))
        url = "http://127.0.0.1:{}{}".format(self.apiPort, path).encode("ascii")
        response = yield Agent(reactor, pool=self.pool).request(
            method.encode("ascii"), url, headers, producer
        )
        data = yield readBody(response)
        return response.code, json.loads(data)

    def raw(self, port, tls=False):
        """
        Connect a L{RawClient} (through verified TLS with C{tls}).
        """
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        if tls:
            trustRoot = Certificate.loadPEM(FilePath(self.caFile).getContent())
            endpoint = wrapClientTLS(optionsForClientTLS("localhost", trustRoot), endpoint)
        client = RawClient()
        return connectProtocol(endpoint, client).addCallback(lambda _: client)

    def token(self, uid, ttl=60):
        return mintToken(self.secret, uid, ttl, time.time())

    def connectClient(self, uid, token=None, tls=True):
        """
        Connect and authenticate a real client; closed at cleanup.
        """
        d = connect(
            reactor,
            "localhost",
            self.sslPort if tls else self.tcpPort,
            uid=uid,
            token=token or self.token(uid),
            deviceId="phone",
            caFile=self.caFile,
            tls=tls,
        )

        def connected(client):
            self.addCleanup(client.close)
            return client

        return d.addCallback(connected)


class ListenerSeparationTests(LiveGateTestCase):
    """
    The HTTP API and the client protocol each answer on their own
    listeners only.
    """

    def assertOnlyFrameTooLarge(self, data):
        self.assertNotIn(b"HTTP/", data)
        [frame] = readFrames(data)
        self.assertEqual((frame.kind, frame.error.code), (pb.ERROR, pb.FRAME_TOO_LARGE))

    @inlineCallbacks
    def test_apiNotOnClientListeners(self):
        """
        An HTTP request with the admin token, to the plain and to the TLS
        client listener, gets an ERROR frame and a close, never an HTTP
        answer, and changes nothing: the group it asked for does not exist.
        """
        body = json.dumps({"group_id": "sneaky", "name": "x", "owner": "mallory"}).encode()
        request = (
            b"POST /v1/groups HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
            + self.adminToken
            + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        for port, tls in [(self.tcpPort, False), (self.sslPort, True)]:
            client = yield self.raw(port, tls)
            client.transport.write(request)
            data = yield client.closed
            self.assertOnlyFrameTooLarge(data)
        status, answer = yield self.api("GET", "/v1/groups/sneaky")
        self.assertEqual((status, answer["error"]["code"]), (404, "GROUP_NOT_FOUND"))
        status, answer = yield self.api("GET", "/health")
        self.assertEqual(status, 200)

    @inlineCallbacks
    def test_clientProtocolNotOnApiPort(self):
        """
        An auth frame with a valid token sent to the API port gets an HTTP
        error (the frame is a malformed request line), never a frame, and
        no session is made.
        """
        client = yield self.raw(self.apiPort)
        auth = pb.AuthRequest(uid="alice", device_id="phone", token=self.token("alice"))
        client.transport.write(
            encodeFrame(
                pb.Frame(kind=pb.REQUEST, seq=1, method="auth", body=auth.SerializeToString())
            )
        )
        client.transport.write(b"\r\n\r\n")
        data = yield client.closed
        self.assertTrue(data.startswith(b"HTTP/1.1 400"), data[:80])
        count = yield self.factory.registry.count()
        self.assertEqual(count, 0)
        self.assertEqual(self.factory.connections, set())

    @inlineCallbacks
    def test_clientTokenIsNoAdminToken(self):
        """
        A client token (or the gate's secret) does not open the HTTP API.
        """
        for token in [self.token("alice").encode("ascii"), self.secret]:
            status, answer = yield self.api("GET", "/v1/stats", token=token)
            self.assertEqual((status, answer["error"]["code"]), (401, "UNAUTHORIZED"))


class LogSecrecyTests(LiveGateTestCase):
    """
    Nothing secret is logged.
    """

    @inlineCallbacks
    def test_noSecretInLogs(self):
        """
        A run with successful and failed auths (over TLS and plain TCP),
        HTTP API calls with the admin token (a token minted, a message
        pushed, a kick) and without it: no formatted log event, text or
        JSON, holds the secret, the admin token, a wrong admin token, or any
        client token presented or minted (nor a token's signature alone).
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        secrets = [self.secret, self.adminToken, b"wrong-admin-token-value-123456789"]

        status, minted = yield self.api("POST", "/v1/tokens", {"uid": "bob"})
        self.assertEqual(status, 200)
        bob = yield self.connectClient("bob", token=minted["token"])
        alice = yield self.connectClient("alice", tls=False)
        yield alice.send("bob", b"hello", "m1")
        secrets += [minted["token"].encode("ascii")]

        refused = [
            ("alice", mintToken(self.secret, "alice", 1, time.time() - 10)),
            ("alice", mintToken(OTHER_SECRET, "alice", 60, time.time())),
            ("alice", self.token("carol")),
            ("alice", "v1.9999999999.garbage-signature-garbage-signature-garbage"),
            ("alice", self.adminToken.decode("ascii")),
        ]
        for uid, token in refused:
            secrets.append(token.encode("ascii"))
            for tls in (True, False):
                d = self.connectClient(uid, token=token, tls=tls)
                error = yield self.assertFailure(d, RemoteError)
                self.assertEqual(error.code, pb.AUTH_FAILED)

        status, _ = yield self.api(
            "POST",
            "/v1/messages",
            {"to": "alice", "text": "sys"},
            headers=[(b"Idempotency-Key", b"k1")],
        )
        self.assertEqual(status, 200)
        status, _ = yield self.api("GET", "/v1/stats", token=secrets[2])
        self.assertEqual(status, 401)
        status, _ = yield self.api("GET", "/v1/users/bob/presence")
        self.assertEqual(status, 200)
        closed = bob.whenClosed()
        status, _ = yield self.api("POST", "/v1/users/bob/kick", {})
        self.assertEqual(status, 200)
        yield closed

        self.assertGreater(len(events), 10)
        for secret in list(secrets):
            text = secret.decode("ascii")
            if text.count(".") == 2:
                # A token's signature alone is as good as the token.
                secrets.append(text.split(".")[2].encode("ascii"))
        lines = []
        for event in events:
            lines.append(formatEvent(event))
            lines.append(logs.formatJSONLine(event))
            lines.append(repr(event))
        text = "\n".join(lines)
        for secret in secrets:
            self.assertNotIn(secret.decode("ascii"), text)
        self.assertIn("failed auth", text)
        self.assertIn("authenticated as alice", text)
