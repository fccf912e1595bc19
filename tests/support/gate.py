# -*- test-case-name: tests.test_protocol,tests.test_delivery,tests.test_groups -*-
"""
The gate on a L{Clock} and L{StringTransport}s, with no reactor and no
socket: L{GateHarness} builds a L{GateFactory} on in-memory registry and
store and drives connections to it; L{DeliveryHarness} adds sending,
acknowledging and reading pushes.
"""

import random

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import Clock, StringTransport
from twisted.python.failure import Failure

from imserver.auth import TokenAuthenticator, mintToken
from imserver.framing import encodeFrame
from imserver.pb import im_pb2 as pb
from imserver.protocol import GateFactory
from imserver.registry.memory import MemorySessionRegistry
from imserver.settings import Settings
from imserver.store.memory import MemoryMessageStore

from tests.support.frames import readFrames, written

#: The token secret of every L{GateHarness}.
SECRET = b"0123456789abcdef0123456789abcdef"


class GateHarness:
    """
    A gate factory with a L{Clock}, and helpers to drive connections to it.
    """

    def __init__(self, testCase, registry=None, store=None, **settings):
        """
        @param registry: the session registry (default: a
            L{MemorySessionRegistry} with the settings' C{max_devices}).
        @param store: the message store (default: a L{MemoryMessageStore}).
        @param settings: the L{Settings} fields that differ from the
            defaults.
        """
        self.testCase = testCase
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.settings = Settings(**settings)
        if registry is None:
            registry = MemorySessionRegistry(maxDevices=self.settings.max_devices)
        self.registry = registry
        self.store = store if store is not None else MemoryMessageStore()
        self.factory = GateFactory(
            settings=self.settings,
            authenticator=TokenAuthenticator(SECRET, self.clock),
            registry=self.registry,
            store=self.store,
            clock=self.clock,
            gateId="test",
            rng=random.Random(4),
        )

    def connect(self):
        """
        A new connection.

        @return: C{(protocol, transport)}
        """
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def token(self, uid, ttl=3600):
        return mintToken(SECRET, uid, ttl, self.clock.seconds())

    def request(self, protocol, method, message, seq=1):
        protocol.dataReceived(
            encodeFrame(
                pb.Frame(kind=pb.REQUEST, seq=seq, method=method, body=message.SerializeToString())
            )
        )

    def auth(self, protocol, uid="alice", device="phone", token=None, seq=1):
        self.request(
            protocol,
            "auth",
            pb.AuthRequest(
                uid=uid,
                device_id=device,
                token=self.token(uid) if token is None else token,
                platform=pb.IOS,
            ),
            seq,
        )

    def authed(self, uid="alice", device="phone"):
        """
        An authenticated connection; its written bytes are cleared.
        """
        protocol, transport = self.connect()
        self.auth(protocol, uid, device)
        [frame] = readFrames(transport.value())
        self.testCase.assertFalse(frame.HasField("error"), frame.error)
        transport.clear()
        return protocol, transport

    def lose(self, protocol):
        protocol.connectionLost(Failure(ConnectionDone()))


class DeliveryHarness(GateHarness):
    """
    A gate with helpers to send, ack and read pushes.
    """

    def __init__(self, testCase, store=None, **settings):
        GateHarness.__init__(self, testCase, store=store, **settings)
        self.seq = 100

    def login(self, uid, device="phone", lastSeq=0, noEcho=False):
        protocol, transport = self.connect()
        self.request(
            protocol,
            "auth",
            pb.AuthRequest(
                uid=uid,
                device_id=device,
                token=self.token(uid),
                last_seq=lastSeq,
                no_echo=noEcho,
            ),
        )
        frames = written(transport)
        self.testCase.assertEqual(frames[0].kind, pb.RESPONSE)
        self.testCase.assertFalse(frames[0].HasField("error"), frames[0].error)
        return protocol, transport, pb.AuthResponse.FromString(frames[0].body), frames[1:]

    def send(self, protocol, to, clientMsgId, body=b"hi", groupId=""):
        self.seq += 1
        self.request(
            protocol,
            "send",
            pb.SendRequest(to=to, group_id=groupId, client_msg_id=clientMsgId, body=body),
            seq=self.seq,
        )

    def notify(self, protocol, method, message):
        protocol.dataReceived(
            encodeFrame(pb.Frame(kind=pb.NOTIFY, method=method, body=message.SerializeToString()))
        )

    def ack(self, protocol, seq):
        self.notify(protocol, "ack", pb.Ack(seq=seq))


def pushes(frames):
    """
    The inbox entries among C{frames}.
    """
    return [
        pb.InboxEntry.FromString(f.body)
        for f in frames
        if f.kind == pb.NOTIFY and f.method == "message"
    ]


def responses(frames):
    """
    The responses among C{frames}.
    """
    return [f for f in frames if f.kind == pb.RESPONSE]
