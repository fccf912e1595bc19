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
        if self._closing:
            return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        size = len(data)
        offset = 0
        unpack = _unpackLength
        while size - offset >= HEADER_LENGTH:
            (length,) = unpack(data, offset)
            if length > self.maxFrameLength:
                self.closeWithError(
                    pb.FRAME_TOO_LARGE,
                    "frame of {} bytes exceeds the limit of {}".format(
                        length, self.maxFrameLength
                    ),
                )
                return
            if length == 0:
                self.closeWithError(pb.EMPTY_FRAME, "zero-length frame")
                return
            end = offset + HEADER_LENGTH + length
            if end > size:
                break
            frame = pb.Frame()
            try:
                frame.ParseFromString(data[offset + HEADER_LENGTH : end])
            except DecodeError:
                self.closeWithError(pb.BAD_FRAME, "frame does not parse")
                return
            offset = end
            self.frameReceived(frame)
            if self._closing:
                return
        if offset < size:
            self._buffer = data[offset:] if offset else data

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
            self.transport.loseConnection()
