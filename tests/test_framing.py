# -*- test-case-name: tests.test_framing -*-
"""
Tests for L{imserver.framing}.
"""

import struct

from hypothesis import given, settings, strategies as st
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from imserver.framing import FrameProtocol, decodeLength, encodeFrame, lengthPrefixed
from imserver.pb import im_pb2 as pb

from tests.support.frames import readFrames


class RecordingFrameProtocol(FrameProtocol):
    """
    Records the frames it receives.
    """

    def __init__(self):
        self.frames = []

    def frameReceived(self, frame):
        self.frames.append(frame)


def connected(maxFrameLength=None):
    """
    A L{RecordingFrameProtocol} connected to a L{StringTransport}.
    """
    protocol = RecordingFrameProtocol()
    if maxFrameLength is not None:
        protocol.maxFrameLength = maxFrameLength
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def sampleFrames(count):
    """
    C{count} distinct frames of various sizes.
    """
    return [
        pb.Frame(kind=pb.REQUEST, seq=i + 1, method="ping", body=b"x" * (i * 37 % 300))
        for i in range(count)
    ]


class EncodeTests(SynchronousTestCase):
    """
    Tests for L{encodeFrame} and L{decodeLength}.
    """

    def test_prefix(self):
        """
        The frame is prefixed with its length as a 4-byte big-endian
        unsigned integer.
        """
        frame = pb.Frame(kind=pb.REQUEST, seq=1, method="ping")
        body = frame.SerializeToString()
        data = encodeFrame(frame)
        self.assertEqual(data[:4], struct.pack(">I", len(body)))
        self.assertEqual(data[4:], body)
        self.assertEqual(decodeLength(data), len(body))
        self.assertEqual(lengthPrefixed(body), data)

    def test_writeFrame(self):
        """
        L{FrameProtocol.writeFrame} writes a serialized frame behind its
        length prefix.
        """
        protocol, transport = connected()
        frame = pb.Frame(kind=pb.REQUEST, seq=1, method="ping")
        protocol.writeFrame(frame.SerializeToString())
        self.assertEqual(transport.value(), encodeFrame(frame))

    def test_pingBytes(self):
        """
        The ping request with seq 1 is exactly the bytes docs/protocol.md
        shows.
        """
        self.assertEqual(
            encodeFrame(pb.Frame(kind=pb.REQUEST, seq=1, method="ping")),
            bytes.fromhex("0000000a080110011a0470696e67"),
        )


class ReceiveTests(SynchronousTestCase):
    """
    Tests for splitting a byte stream into frames.
    """

    def test_oneFrame(self):
        """
        A complete frame in one read is delivered.
        """
        protocol, _ = connected()
        frame = sampleFrames(1)[0]
        protocol.dataReceived(encodeFrame(frame))
        self.assertEqual(protocol.frames, [frame])

    @settings(max_examples=50, deadline=None)
    @given(st.data())
    def test_splitAnywhere(self, data):
        """
        However a stream of frames is cut into reads, the same frames come
        out in the same order.
        """
        frames = sampleFrames(data.draw(st.integers(1, 8)))
        stream = b"".join(encodeFrame(f) for f in frames)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20, unique=True)))
        protocol, _ = connected()
        start = 0
        for cut in cuts + [len(stream)]:
            protocol.dataReceived(stream[start:cut])
            start = cut
        self.assertEqual(protocol.frames, frames)

    def test_everyByteBoundary(self):
        """
        Two frames split into two reads at every byte boundary come out
        whole, and byte by byte too.
        """
        frames = sampleFrames(2)
        stream = b"".join(encodeFrame(f) for f in frames)
        for cut in range(len(stream) + 1):
            protocol, _ = connected()
            protocol.dataReceived(stream[:cut])
            protocol.dataReceived(stream[cut:])
            self.assertEqual(protocol.frames, frames, "cut at {}".format(cut))
        protocol, _ = connected()
        for i in range(len(stream)):
            protocol.dataReceived(stream[i : i + 1])
        self.assertEqual(protocol.frames, frames)

    def test_manyInOneRead(self):
        """
        Many frames in one read are all delivered, in order.
        """
        frames = sampleFrames(100)
        protocol, _ = connected()
        protocol.dataReceived(b"".join(encodeFrame(f) for f in frames))
        self.assertEqual(protocol.frames, frames)

    def test_maxLengthAccepted(self):
        """
        A frame exactly at the limit is accepted.
        """
        frame = pb.Frame(kind=pb.NOTIFY, method="x", body=b"a" * 100)
        protocol, transport = connected(maxFrameLength=len(frame.SerializeToString()))
        protocol.dataReceived(encodeFrame(frame))
        self.assertEqual(protocol.frames, [frame])
        self.assertFalse(transport.disconnecting)


class FramingErrorTests(SynchronousTestCase):
    """
    Every framing error produces an ERROR frame with its code and a clean
    close, and nothing after it is processed.
    """

    def assertClosedWith(self, protocol, transport, code):
        """
        The transport got exactly one ERROR frame with C{code} and was closed.
        """
        written = readFrames(transport.value())
        self.assertEqual(len(written), 1)
        self.assertEqual(written[0].kind, pb.ERROR)
        self.assertEqual(written[0].error.code, code)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.frames, [])

    def test_zeroLength(self):
        """
        A zero length prefix is C{EMPTY_FRAME}.
        """
        protocol, transport = connected()
        protocol.dataReceived(b"\x00\x00\x00\x00")
        self.assertClosedWith(protocol, transport, pb.EMPTY_FRAME)

    def test_oversizeBeforeBody(self):
        """
        A length over the limit is C{FRAME_TOO_LARGE} as soon as the 4-byte
        header arrives, before any body is buffered.
        """
        protocol, transport = connected(maxFrameLength=1000)
        protocol.dataReceived(struct.pack(">I", 1001))
        self.assertClosedWith(protocol, transport, pb.FRAME_TOO_LARGE)
        self.assertEqual(protocol._buffer, b"")

    def test_maximumLengthPrefix(self):
        """
        A length prefix of 2^32-1 is refused at once.
        """
        protocol, transport = connected()
        protocol.dataReceived(b"\xff\xff\xff\xff" + b"x" * 10)
        self.assertClosedWith(protocol, transport, pb.FRAME_TOO_LARGE)

    def test_garbage(self):
        """
        Bytes that are not a protobuf message are C{BAD_FRAME}.
        """
        protocol, transport = connected()
        protocol.dataReceived(struct.pack(">I", 3) + b"\xff\xff\xff")
        self.assertClosedWith(protocol, transport, pb.BAD_FRAME)

    def test_nothingAfterError(self):
        """
        Frames behind an invalid one, in the same read or later, are ignored.
        """
        protocol, transport = connected()
        good = encodeFrame(sampleFrames(1)[0])
        protocol.dataReceived(b"\x00\x00\x00\x00" + good)
        protocol.dataReceived(good)
        self.assertClosedWith(protocol, transport, pb.EMPTY_FRAME)

    def test_framesBeforeErrorDelivered(self):
        """
        Valid frames ahead of an invalid one in the same read are delivered.
        """
        protocol, transport = connected()
        frame = sampleFrames(1)[0]
        protocol.dataReceived(encodeFrame(frame) + b"\x00\x00\x00\x00")
        self.assertEqual(protocol.frames, [frame])
        self.assertTrue(transport.disconnecting)

    def test_partialHeaderThenClose(self):
        """
        A length prefix cut short is buffered, not an error; nothing is
        delivered.
        """
        protocol, transport = connected()
        protocol.dataReceived(b"\x00\x00")
        self.assertEqual(protocol.frames, [])
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_closeWithErrorIdempotent(self):
        """
        A second C{closeWithError} writes nothing more.
        """
        protocol, transport = connected()
        protocol.closeWithError(pb.IDLE_TIMEOUT, "idle")
        protocol.closeWithError(pb.AUTH_TIMEOUT, "late")
        self.assertClosedWith(protocol, transport, pb.IDLE_TIMEOUT)

    def test_noWritesAfterClose(self):
        """
        L{FrameProtocol.writeFrame} writes nothing once the protocol is
        closing.
        """
        protocol, transport = connected()
        protocol.close()
        protocol.writeFrame(sampleFrames(1)[0].SerializeToString())
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
