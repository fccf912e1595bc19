# -*- test-case-name: tests.test_framing -*-
"""
Length-prefixed protobuf framing.

On the wire every frame is a 4-byte big-endian unsigned length followed by
exactly that many bytes holding one serialized L{pb.Frame}.  This module
splits a byte stream into frames and nothing else; what frames mean is the
business of L{imserver.rpc}.
"""

import struct

from google.protobuf.message import DecodeError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from imserver.pb import im_pb2 as pb

_header = struct.Struct("!I")
HEADER_LENGTH = _header.size
_packLength = _header.pack
_unpackLength = _header.unpack_from

#: The default largest frame, in bytes, length prefix excluded.
DEFAULT_MAX_FRAME_LENGTH = 64 * 1024


_SMALL_VARINTS = [bytes((i,)) for i in range(0x80)]


def varint(value):
    """
    The protobuf base-128 varint of a non-negative C{value}.

    @rtype: L{bytes}
    """
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# The fields of pb.Frame, as protobuf puts them on the wire (field number
# << 3 | wire type): kind (1, varint), seq (2, varint), method (3, bytes),
# body (4, bytes).
_KIND_RESPONSE = b"\x08\x02"
_SEQ = b"\x10"
_METHOD = b"\x1a"
_BODY = b"\x22"
_KIND_NOTIFY = b"\x08\x03"


def encodeResponse(seq, body):
    """
    The length-prefixed RESPONSE frame answering request C{seq} with
    C{body} (a serialized response message): the exact bytes
    L{encodeFrame} gives for the same L{pb.Frame}, without building one.

    @rtype: L{bytes}
    """
    if body:
        data = b"".join((_KIND_RESPONSE, _SEQ, varint(seq), _BODY, varint(len(body)), body))
    else:
        data = _KIND_RESPONSE + _SEQ + varint(seq)
    return _packLength(len(data)) + data


def notifyPrefix(name):
    """
    What every NOTIFY frame of method C{name} starts with (after the length
    prefix): the kind and the method name.  L{encodeNotify} completes it.

    @type name: L{str}
    @rtype: L{bytes}
    """
    encoded = name.encode("utf-8")
    return _KIND_NOTIFY + _METHOD + varint(len(encoded)) + encoded


def encodeNotify(prefix, body):
    """
    The length-prefixed NOTIFY frame of the method whose L{notifyPrefix} is
    C{prefix}, carrying C{body}: the exact bytes L{encodeFrame} gives.

    @rtype: L{bytes}
    """
    if body:
        data = b"".join((prefix, _BODY, varint(len(body)), body))
    else:
        data = prefix
    return _packLength(len(data)) + data


def encodeFrame(frame):
    """
    Serialize C{frame} with its length prefix.

    @type frame: L{pb.Frame}
    @rtype: L{bytes}
    """
    body = frame.SerializeToString()
    return _packLength(len(body)) + body


def decodeLength(header):
    """
    Read a length prefix.

    @param header: at least L{HEADER_LENGTH} bytes.
    @rtype: L{int}
    """
    return _unpackLength(header)[0]


class FrameProtocol(Protocol):
    """
    Turn a byte stream into L{pb.Frame} objects and back.

    Subclasses implement L{frameReceived}.  A zero length, a length above
    L{maxFrameLength} (checked before any of the body is buffered) or bytes
    that are not a valid frame produce an ERROR frame and a clean close; no
    further input is processed after that.

    @ivar maxFrameLength: the largest acceptable frame, length prefix
        excluded.  May be changed at any time (the gate raises it after auth).
    """

    log = Logger()
    maxFrameLength = DEFAULT_MAX_FRAME_LENGTH
    #: Names the connection in log events; the gate numbers its connections.
    connectionId = "-"
    _buffer = b""
    _closing = False

    def dataReceived(self, data):
        """
        Split C{data} (and what was left of earlier reads) into frames and
        hand each to L{frameReceived}.

        @return: how many frames were handed over (subclasses count them).
        """
        if self._closing:
            return 0
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        size = len(data)
        offset = 0
        count = 0
        unpack = _unpackLength
        Frame = pb.Frame
        while size - offset >= HEADER_LENGTH:
            (length,) = unpack(data, offset)
            if length > self.maxFrameLength:
                self.closeWithError(
                    pb.FRAME_TOO_LARGE,
                    "frame of {} bytes exceeds the limit of {}".format(
                        length, self.maxFrameLength
                    ),
                )
                return count
            if length == 0:
                self.closeWithError(pb.EMPTY_FRAME, "zero-length frame")
                return count
            end = offset + HEADER_LENGTH + length
            if end > size:
                break
            frame = Frame()
            try:
                frame.ParseFromString(data[offset + HEADER_LENGTH : end])
            except DecodeError:
                self.closeWithError(pb.BAD_FRAME, "frame does not parse")
                return count
            offset = end
            count += 1
            self.frameReceived(frame)
            if self._closing:
                return count
        if offset < size:
            self._buffer = data[offset:] if offset else data
        return count

    def frameReceived(self, frame):
        """
        Handle one complete frame.

        @type frame: L{pb.Frame}
        """
        raise NotImplementedError()

    def sendFrame(self, frame):
        """
        Write one frame, unless the connection is closing.

        @type frame: L{pb.Frame}
        """
        self.sendEncoded(encodeFrame(frame))

    def sendEncoded(self, data):
        """
        Write one frame already encoded with its length prefix (a frame
        serialized once for many connections), unless the connection is
        closing.

        @type data: L{bytes}
        """
        if not self._closing:
            self.transport.write(data)

    def closeWithError(self, code, message, seq=0):
        """
        Send an ERROR frame and close the connection cleanly.  Further input
        is ignored.  Idempotent.

        @param code: an L{pb.ErrorCode}.
        @param message: detail for the peer's logs.
        @param seq: the seq of the request that caused it, if any.
        """
        if self._closing:
            return
        self.log.info(
            "closing connection {conn}: {code} {detail}",
            conn=self.connectionId,
            code=pb.ErrorCode.Name(code),
            detail=message,
        )
        self.sendFrame(
            pb.Frame(kind=pb.ERROR, seq=seq, error=pb.Error(code=code, message=message))
        )
        self.close()

    def close(self):
        """
        Close the connection after pending writes; further input is ignored.
        Idempotent.
        """
        if not self._closing:
            self._closing = True
            self._buffer = b""
            self.closeTransport()

    def closeTransport(self):
        """
        Close the transport after pending writes: called once, by L{close}.
        Subclasses may bound how long that takes.
        """
        self.transport.loseConnection()
