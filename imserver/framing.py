# -*- test-case-name: tests.test_framing -*-
"""
Length-prefixed protobuf framing: the TCP transport of frames.

On the wire every frame is a 4-byte big-endian unsigned length followed by
exactly that many bytes holding one serialized L{pb.Frame}.  This module
splits a byte stream into frames and prefixes the frames it writes, and
nothing else: what frames hold is built by L{imserver.wire}, what they mean
is the business of L{imserver.rpc}.
"""

import struct
from collections.abc import Callable

from google.protobuf.message import DecodeError
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from imserver.pb import im_pb2 as pb
from imserver.wire import HEADER_LENGTH, ClosesWithError, packLength

_header = struct.Struct("!I")
_packLength = packLength
_unpackLength: Callable[..., tuple[int]] = _header.unpack_from

#: The default largest frame, in bytes, length prefix excluded.
DEFAULT_MAX_FRAME_LENGTH = 64 * 1024


def lengthPrefixed(data: bytes) -> bytes:
    """
    The bytes of one frame on a TCP stream: C{data} (a serialized
    L{pb.Frame}) behind its length prefix.

    @rtype: L{bytes}
    """
    return _packLength(len(data)) + data


def encodeFrame(frame: pb.Frame) -> bytes:
    """
    Serialize C{frame} with its length prefix.

    @type frame: L{pb.Frame}
    @rtype: L{bytes}
    """
    return lengthPrefixed(frame.SerializeToString())


def decodeLength(header: bytes) -> int:
    """
    Read a length prefix.

    @param header: at least L{HEADER_LENGTH} bytes.
    @rtype: L{int}
    """
    return _unpackLength(header)[0]


class FrameProtocol(ClosesWithError, Protocol):
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
    #: Set by makeConnection: frames are written only once connected.
    transport: ITransport

    def dataReceived(self, data: bytes) -> int:  # type: ignore[override]
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
                    "frame of {} bytes exceeds the limit of {}".format(length, self.maxFrameLength),
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

    def frameReceived(self, frame: pb.Frame) -> None:
        """
        Handle one complete frame.

        @type frame: L{pb.Frame}
        """
        raise NotImplementedError()

    def writeFrame(self, data: bytes) -> None:
        """
        Write one frame, C{data} (a serialized L{pb.Frame}, from
        L{imserver.wire}), with its length prefix, unless the connection is
        closing.

        @type data: L{bytes}
        """
        if not self._closing:
            self.transport.write(_packLength(len(data)) + data)

    def close(self) -> None:
        """
        Close the connection after pending writes; further input is ignored.
        Idempotent.
        """
        if not self._closing:
            self._closing = True
            self._buffer = b""
            self.closeTransport()

    def closeTransport(self) -> None:
        """
        Close the transport after pending writes: called once, by L{close}.
        Subclasses may bound how long that takes.
        """
        self.transport.loseConnection()
