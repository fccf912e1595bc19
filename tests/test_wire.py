# -*- test-case-name: tests.test_wire -*-
"""
Tests for L{imserver.wire}: every hand-assembled frame is the exact
serialization protobuf gives the same L{pb.Frame}.
"""

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imserver.pb import im_pb2 as pb
from imserver.wire import (
    EncodedMessage,
    encodeError,
    encodeErrorResponse,
    encodeNotice,
    encodeNotify,
    encodeRequest,
    encodeResponse,
    notifyPrefix,
    packLength,
    varint,
)

T0 = 1_700_000_000_000


def serialized(**fields):
    return pb.Frame(**fields).SerializeToString()


class EncoderTests(SynchronousTestCase):
    """
    The encoders of requests, responses, errors and notifies.
    """

    @given(st.integers(min_value=0, max_value=2**64 - 1))
    def test_varint(self, value):
        """
        L{varint} is protobuf's varint (a uint64 field's value).
        """
        encoded = pb.Ack(seq=value).SerializeToString()
        if value:
            self.assertEqual(b"\x08" + varint(value), encoded)
        else:
            self.assertEqual(varint(value), b"\x00")

    @given(st.integers(min_value=1, max_value=2**32 - 1), st.binary(max_size=300))
    def test_response(self, seq, body):
        """
        L{encodeResponse} is the RESPONSE frame, empty body included.
        """
        self.assertEqual(
            encodeResponse(seq, body), serialized(kind=pb.RESPONSE, seq=seq, body=body)
        )

    @given(
        st.sampled_from(["message", "ack", "typing", "kicked", "x" * 200]), st.binary(max_size=300)
    )
    def test_notify(self, name, body):
        """
        L{encodeNotify} with the method's L{notifyPrefix} is the NOTIFY
        frame, empty body included.
        """
        self.assertEqual(
            encodeNotify(notifyPrefix(name), body),
            serialized(kind=pb.NOTIFY, method=name, body=body),
        )

    def test_request(self):
        """
        L{encodeRequest} is the REQUEST frame.
        """
        self.assertEqual(
            encodeRequest(7, "ping", b"\x01"),
            serialized(kind=pb.REQUEST, seq=7, method="ping", body=b"\x01"),
        )

    def test_errors(self):
        """
        L{encodeError} is the ERROR frame, L{encodeErrorResponse} the
        RESPONSE frame carrying an error.
        """
        error = pb.Error(code=pb.AUTH_FAILED, message="no")
        self.assertEqual(
            encodeError(pb.AUTH_FAILED, "no", 3), serialized(kind=pb.ERROR, seq=3, error=error)
        )
        self.assertEqual(
            encodeErrorResponse(3, pb.AUTH_FAILED, "no"),
            serialized(kind=pb.RESPONSE, seq=3, error=error),
        )

    def test_notice(self):
        """
        L{encodeNotice} is the C{notice} NOTIFY frame.
        """
        notice = pb.Notice(body=b"hi", content_type="text/plain", server_time_ms=T0)
        self.assertEqual(
            encodeNotice(b"hi", "text/plain", T0),
            serialized(kind=pb.NOTIFY, method="notice", body=notice.SerializeToString()),
        )


class EncodedMessageTests(SynchronousTestCase):
    """
    L{EncodedMessage.frame} gives the bytes protobuf gives.
    """

    @given(
        seq=st.integers(min_value=1, max_value=2**64 - 1),
        outgoing=st.booleans(),
        body=st.binary(max_size=70000),
        sender=st.text(max_size=20),
        groupId=st.text(max_size=20),
        messageId=st.integers(min_value=0, max_value=2**64 - 1),
    )
    def test_sameAsProtobuf(self, seq, outgoing, body, sender, groupId, messageId):
        """
        The hand-assembled frame equals the encoding of the same
        L{pb.Frame} holding the same L{pb.InboxEntry}.
        """
        message = pb.Message(
            id=messageId, sender=sender, group_id=groupId, body=body, created_ms=T0
        )
        entry = pb.InboxEntry(seq=seq, outgoing=outgoing, message=message)
        expected = serialized(kind=pb.NOTIFY, method="message", body=entry.SerializeToString())
        self.assertEqual(EncodedMessage(message).frame(seq, outgoing), expected)

    @given(
        seqs=st.lists(
            st.tuples(st.integers(min_value=1, max_value=2**64 - 1), st.booleans()),
            min_size=2,
            max_size=30,
        ),
        body=st.binary(max_size=300),
    )
    def test_manyFramesOfOneMessage(self, seqs, body):
        """
        Every frame of one message (the parts shared by frames whose seqs
        have varints of the same length are reused) is protobuf's.
        """
        message = pb.Message(id=7, sender="alice", group_id="g", body=body, created_ms=T0)
        encoded = EncodedMessage(message)
        for seq, outgoing in seqs + [(127, False), (128, False), (127, True), (16384, True)]:
            entry = pb.InboxEntry(seq=seq, outgoing=outgoing, message=message)
            expected = serialized(kind=pb.NOTIFY, method="message", body=entry.SerializeToString())
            self.assertEqual(encoded.frame(seq, outgoing), expected)

    def test_fromBytes(self):
        """
        A message known by its bytes only (from the gate bus) gives the same
        frames, and parses them only when asked.
        """
        message = pb.Message(id=7, sender="alice", recipient="bob", body=b"hi")
        encoded = EncodedMessage.fromBytes(message.SerializeToString())
        self.assertEqual(encoded.frame(5, True), EncodedMessage(message).frame(5, True))
        self.assertEqual(encoded.message, message)


class StreamFrameTests(SynchronousTestCase):
    """
    L{EncodedMessage.streamFrame}: the frame as a stream transport writes
    it.
    """

    @given(
        seqs=st.lists(
            st.tuples(st.integers(min_value=1, max_value=2**64 - 1), st.booleans()),
            min_size=1,
            max_size=20,
        ),
        body=st.binary(max_size=300),
    )
    def test_lengthPrefixedFrame(self, seqs, body):
        """
        It is L{EncodedMessage.frame} behind its 4-byte length prefix,
        whichever of the two is asked for first.
        """
        message = pb.Message(id=7, sender="alice", recipient="bob", body=body)
        for firstStream in (True, False):
            encoded = EncodedMessage(message)
            for seq, outgoing in seqs + [(127, False), (128, True)]:
                if firstStream:
                    stream = encoded.streamFrame(seq, outgoing)
                    frame = encoded.frame(seq, outgoing)
                else:
                    frame = encoded.frame(seq, outgoing)
                    stream = encoded.streamFrame(seq, outgoing)
                self.assertEqual(stream, packLength(len(frame)) + frame)
