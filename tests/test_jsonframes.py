# -*- test-case-name: tests.test_jsonframes -*-
"""
The C{imserver.v1.json} form of frames (L{imserver.web.jsonframes}), the
examples of docs/protocol.md section 17, and the origin policy of the web
listener.
"""

import json
import re

from twisted.trial.unittest import SynchronousTestCase

from imserver.pb import im_pb2 as pb
from imserver.web.jsonframes import (
    JSONFrameEncoder,
    JSONFrameError,
    decodeFrame,
    encodeJSON,
)
from imserver.web.websocket import OriginPolicy, isLoopbackHost
from imserver.wire import (
    EncodedMessage,
    encodeError,
    encodeErrorResponse,
    encodeNotify,
    encodeRequest,
    encodeResponse,
    notifyPrefix,
)

from tests.test_docs import protocolText


def section17():
    """
    Section 17 of docs/protocol.md, its subsections included.
    """
    text = protocolText()
    return text[text.index("\n## 17. WebSocket") :]


def documentedExamples():
    """
    The frames of section 17.4's examples, in their order, made by the code.
    """
    auth = pb.AuthRequest(
        uid="alice",
        token="v1.1795353407.3kJ8...",
        device_id="web-7f3a",
        platform=pb.WEB,
        last_seq=41,
        client_version="imserver.js/1",
    )
    response = pb.AuthResponse(
        heartbeat_interval_ms=27512,
        idle_timeout_ms=90000,
        server_time_ms=1795267007410,
        session_id="gate-1:4242/17",
        max_frame_length=65536,
        head_seq=42,
        max_message_body=32768,
        max_unacked=64,
    )
    send = pb.SendRequest(
        to="bob",
        client_msg_id="5b0c7d1e-2f6a-4b8e-9d3c-7a1f0e4b2c6d",
        body=b"hello bob",
        content_type="text/plain",
    )
    sent = pb.SendResponse(message_id=1001, server_time_ms=1795267007455, seq=43)
    message = pb.Message(
        id=1002,
        sender="bob",
        recipient="alice",
        client_msg_id="b-17",
        body=b"hi alice",
        content_type="text/plain",
        created_ms=1795267008012,
    )
    return [
        encodeJSON(encodeRequest(1, "auth", auth.SerializeToString())),
        encodeJSON(encodeResponse(1, response.SerializeToString()), "auth"),
        encodeJSON(encodeRequest(2, "send", send.SerializeToString())),
        encodeJSON(encodeResponse(2, sent.SerializeToString()), "send"),
        JSONFrameEncoder().encodeMessage(EncodedMessage(message), 44, False),
        encodeJSON(encodeNotify(notifyPrefix("ack"), pb.Ack(seq=44).SerializeToString())),
        encodeJSON(
            encodeErrorResponse(3, pb.MESSAGE_TOO_LARGE, "body of 40000 bytes exceeds 32768")
        ),
        encodeJSON(encodeError(pb.IDLE_TIMEOUT, "nothing received for the idle timeout")),
    ]


class DocumentedExamplesTests(SynchronousTestCase):
    """
    docs/protocol.md section 17 shows what the code produces.
    """

    def test_jsonExamples(self):
        """
        Each JSON example of section 17 is, byte for byte, what the code
        writes for it, and each parses back.
        """
        text = section17()
        blocks = re.findall(r"```json\n(.*?)\n```", text, re.S)
        self.assertEqual(blocks, documentedExamples())
        for block in blocks:
            decodeFrame(block)

    def test_protoExample(self):
        """
        The binary message of section 17.3 is the ping request of section 4
        without its length prefix.
        """
        text = section17()
        [dump] = re.findall(r"```\n([0-9a-f ]+)\n```", text)
        self.assertEqual(bytes.fromhex(dump), encodeRequest(1, "ping", b""))


class DecodeTests(SynchronousTestCase):
    """
    L{decodeFrame} reads the JSON form, and refuses what does not map onto
    a frame.
    """

    def test_request(self):
        frame = decodeFrame(
            b'{"kind":"REQUEST","seq":7,"method":"send",'
            b'"body":{"to":"bob","clientMsgId":"m","body":"aGk="}}'
        )
        self.assertEqual((frame.kind, frame.seq, frame.method), (pb.REQUEST, 7, "send"))
        self.assertEqual(
            pb.SendRequest.FromString(frame.body),
            pb.SendRequest(to="bob", client_msg_id="m", body=b"hi"),
        )

    def test_protoNamesNumbersAndStrings(self):
        """
        The C{.proto} field names, enum numbers, and 64-bit integers as
        numbers are read too.
        """
        frame = decodeFrame('{"kind":3,"method":"ack","body":{"seq":44}}')
        self.assertEqual(frame.kind, pb.NOTIFY)
        self.assertEqual(pb.Ack.FromString(frame.body).seq, 44)
        frame = decodeFrame(
            '{"kind":"REQUEST","seq":1,"method":"auth",'
            '"body":{"device_id":"d","last_seq":"9","platform":3}}'
        )
        auth = pb.AuthRequest.FromString(frame.body)
        self.assertEqual((auth.device_id, auth.last_seq, auth.platform), ("d", 9, pb.WEB))

    def test_noBody(self):
        frame = decodeFrame('{"kind":"REQUEST","seq":2,"method":"ping"}')
        self.assertEqual(frame.body, b"")

    def test_unknownMethod(self):
        """
        The body of an unknown method or notification is not read (the
        dispatcher answers or ignores it as in the protobuf form).
        """
        frame = decodeFrame('{"kind":"REQUEST","seq":2,"method":"nosuch","body":{"x":[1]}}')
        self.assertEqual((frame.method, frame.body), ("nosuch", b""))
        frame = decodeFrame('{"kind":"NOTIFY","method":"nosuch","body":{"x":1}}')
        self.assertEqual(frame.method, "nosuch")
        for body in ['"x"', "[1, 2]", "3"]:
            frame = decodeFrame('{"kind":"REQUEST","seq":2,"method":"nosuch","body":%s}' % body)
            self.assertEqual(frame.body, b"")

    def test_refused(self):
        """
        Not JSON, not an object, an unknown field (of the frame or of the
        body), a wrong type (a boolean for an enum too), or a body of a
        known method that is not an object: refused.
        """
        for text in [
            b"",
            b"{",
            b'"frame"',
            b"[]",
            b'{"kind":"REQUEST","seq":1,"method":"ping","extra":1}',
            b'{"kind":"REQUEST","seq":1,"method":"ping","body":{"extra":1}}',
            b'{"kind":"REQUEST","seq":"one","method":"ping"}',
            b'{"kind":"REQUEST","seq":4294967296,"method":"ping"}',
            b'{"kind":"BOGUS"}',
            b'{"kind":"REQUEST","seq":1,"method":"send","body":{"to":1}}',
            b'{"kind":"REQUEST","seq":1,"method":"send","body":"hi"}',
            b'{"kind":true}',
            b'{"kind":"REQUEST","seq":true,"method":"ping"}',
            b'{"kind":"NOTIFY","method":"ack","body":{"seq":-1}}',
            b"[" * 100000 + b"]" * 100000,
        ]:
            self.assertRaises(JSONFrameError, decodeFrame, text)


class EncodeTests(SynchronousTestCase):
    """
    L{JSONFrameEncoder} writes the JSON form of the frames a session writes.
    """

    def test_responseTypedByRequest(self):
        """
        A response's body is typed by the method of the request it answers,
        remembered until then.
        """
        encoder = JSONFrameEncoder()
        encoder.requestReceived(pb.Frame(kind=pb.REQUEST, seq=5, method="ping"))
        data = encodeResponse(5, pb.PingResponse(server_time_ms=12).SerializeToString())
        self.assertEqual(
            json.loads(encoder.encode(data)),
            {"kind": "RESPONSE", "seq": 5, "body": {"serverTimeMs": "12"}},
        )
        # Answered: a second response for seq 5 has no known type.
        self.assertEqual(json.loads(encoder.encode(data)), {"kind": "RESPONSE", "seq": 5})

    def test_emptyBody(self):
        encoder = JSONFrameEncoder()
        encoder.requestReceived(pb.Frame(kind=pb.REQUEST, seq=1, method="leave"))
        self.assertEqual(
            json.loads(encoder.encode(encodeResponse(1, b""))),
            {"kind": "RESPONSE", "seq": 1, "body": {}},
        )

    def test_message(self):
        """
        The C{message} push is the canonical JSON of the inbox entry; the
        message's own JSON is made once for all recipients.
        """
        message = pb.Message(id=3, sender="a", recipient="b", body=b"\x00\xff")
        encoded = EncodedMessage(message)
        encoder = JSONFrameEncoder()
        for seq, outgoing in [(1, False), (2**40, True)]:
            expected = json.loads(
                encodeJSON(
                    encodeNotify(
                        notifyPrefix("message"),
                        pb.InboxEntry(
                            seq=seq, outgoing=outgoing, message=message
                        ).SerializeToString(),
                    )
                )
            )
            self.assertEqual(json.loads(encoder.encodeMessage(encoded, seq, outgoing)), expected)
        cached = encoded.jsonCache
        encoder.encodeMessage(encoded, 9, False)
        self.assertIs(encoded.jsonCache, cached)

    def test_nonASCII(self):
        """
        Text is written as UTF-8, not escaped.
        """
        data = encodeNotify(
            notifyPrefix("typing"), pb.Typing(uid="zoë", active=True).SerializeToString()
        )
        self.assertIn("zoë", JSONFrameEncoder().encode(data))


class OriginPolicyTests(SynchronousTestCase):
    """
    L{OriginPolicy}: same origin, loopback and the allowed list.
    """

    def test_noOrigin(self):
        self.assertTrue(OriginPolicy().allows(None, "gate.example.com"))

    def test_sameOrigin(self):
        policy = OriginPolicy()
        self.assertTrue(policy.allows("https://gate.example.com", "gate.example.com"))
        self.assertTrue(policy.allows("https://Gate.Example.com:443", "gate.example.com"))
        self.assertTrue(policy.allows("http://gate.example.com:8080", "gate.example.com:8080"))
        # The scheme is not compared: behind a TLS terminator the gate sees
        # plain HTTP for an https page.
        self.assertTrue(policy.allows("https://gate.example.com", "gate.example.com"))
        self.assertFalse(policy.allows("https://gate.example.com:444", "gate.example.com"))
        self.assertFalse(policy.allows("https://gate.example.com", "gate.example.com:8443"))

    def test_foreign(self):
        policy = OriginPolicy()
        for origin in [
            "https://evil.example.net",
            "null",
            "file://",
            "https://gate.example.com.evil.net",
            "",
        ]:
            self.assertFalse(policy.allows(origin, "gate.example.com"), origin)

    def test_loopback(self):
        policy = OriginPolicy()
        for origin in ["http://localhost:3000", "http://127.0.0.2", "http://[::1]:8080"]:
            self.assertTrue(policy.allows(origin, "gate.example.com"), origin)
        self.assertFalse(
            OriginPolicy(allowLoopback=False).allows("http://localhost", "gate.example.com")
        )
        self.assertFalse(isLoopbackHost("127.example.com"))

    def test_allowed(self):
        policy = OriginPolicy(["https://app.example.com"])
        self.assertTrue(policy.allows("https://app.example.com", "gate.example.com"))
        self.assertFalse(policy.allows("https://app2.example.com", "gate.example.com"))
        self.assertTrue(OriginPolicy(["*"]).allows("https://any.example", "gate"))

    def test_normalise(self):
        self.assertEqual(OriginPolicy.normalise("HTTPS://A.example:443"), "https://a.example")
        self.assertEqual(OriginPolicy.normalise("http://[::1]:80/"), "http://[::1]")
        for bad in ["ftp://a", "https://", "https://a/path", "a.example"]:
            self.assertRaises(ValueError, OriginPolicy.normalise, bad)
