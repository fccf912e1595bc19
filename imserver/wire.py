# -*- test-case-name: tests.test_wire -*-
"""
The wire objects: one encoder for each kind of L{pb.Frame} the gate sends.

Every encoder returns the serialized C{Frame} only, the bytes a transport
carries as one frame: TCP puts a length prefix before them
(L{imserver.framing}), a WebSocket message would carry them as they are.
Responses, notifies and message pushes are assembled by hand instead of
through protobuf objects (they are the hot paths); each gives exactly the
bytes protobuf gives for the same C{Frame}, which the tests check.

The logic layer never builds frame bytes: it hands the sessions values, or
an L{EncodedMessage} (a message serialized once for all its recipients),
and the sessions encode with this module.
"""

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from imserver.pb import im_pb2 as pb

if TYPE_CHECKING:
    from twisted.logger import Logger

_header = struct.Struct("!I")
#: Bytes of the length prefix stream transports put before each frame.
HEADER_LENGTH = _header.size
#: The 4-byte big-endian length prefix of a frame of the given length
#: (docs/protocol.md, section 2; L{imserver.framing} splits streams by it).
packLength: Callable[[int], bytes] = _header.pack

_SMALL_VARINTS = [bytes((i,)) for i in range(0x80)]


def varint(value: int) -> bytes:
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
# pb.InboxEntry: seq (1, varint), outgoing (2, bool), message (3, bytes).
_ENTRY_SEQ = b"\x08"
_ENTRY_OUTGOING = b"\x10\x01"
_ENTRY_MESSAGE = b"\x1a"


def encodeFrame(frame: pb.Frame) -> bytes:
    """
    Serialize any C{frame} (the general, slower encoder).

    @type frame: L{pb.Frame}
    @rtype: L{bytes}
    """
    return frame.SerializeToString()


def encodeRequest(seq: int, method: str, body: bytes) -> bytes:
    """
    The REQUEST frame C{seq} of C{method} (its name) carrying C{body}.
    """
    return pb.Frame(kind=pb.REQUEST, seq=seq, method=method, body=body).SerializeToString()


def encodeResponse(seq: int, body: bytes) -> bytes:
    """
    The RESPONSE frame answering request C{seq} with C{body} (a serialized
    response message).

    @rtype: L{bytes}
    """
    if body:
        return b"".join((_KIND_RESPONSE, _SEQ, varint(seq), _BODY, varint(len(body)), body))
    return _KIND_RESPONSE + _SEQ + varint(seq)


def encodeErrorResponse(seq: int, code: "pb.ErrorCode", message: str) -> bytes:
    """
    The RESPONSE frame refusing request C{seq} with error C{code}.
    """
    return pb.Frame(
        kind=pb.RESPONSE, seq=seq, error=pb.Error(code=code, message=message)
    ).SerializeToString()


def encodeError(code: "pb.ErrorCode", message: str, seq: int = 0) -> bytes:
    """
    The ERROR frame that precedes a close: C{code}, detail C{message}, and
    the seq of the request that caused it (0: none).
    """
    return pb.Frame(
        kind=pb.ERROR, seq=seq, error=pb.Error(code=code, message=message)
    ).SerializeToString()


def notifyPrefix(name: str) -> bytes:
    """
    What every NOTIFY frame of method C{name} starts with: the kind and the
    method name.  L{encodeNotify} completes it.

    @type name: L{str}
    @rtype: L{bytes}
    """
    encoded = name.encode("utf-8")
    return _KIND_NOTIFY + _METHOD + varint(len(encoded)) + encoded


def encodeNotify(prefix: bytes, body: bytes) -> bytes:
    """
    The NOTIFY frame of the method whose L{notifyPrefix} is C{prefix},
    carrying C{body}.

    @rtype: L{bytes}
    """
    if body:
        return b"".join((prefix, _BODY, varint(len(body)), body))
    return prefix


_NOTICE = notifyPrefix("notice")


def encodeNotice(body: bytes, contentType: str, serverTimeMs: int) -> bytes:
    """
    The C{notice} NOTIFY frame (a system notice, nothing stored).
    """
    notice = pb.Notice(body=body, content_type=contentType, server_time_ms=serverTimeMs)
    return encodeNotify(_NOTICE, notice.SerializeToString())


#: Frame.kind = NOTIFY, Frame.method = "message", then Frame.body's tag.
_NOTIFY_MESSAGE = notifyPrefix("message") + _BODY


class EncodedMessage:
    """
    A stored message on its way to every session of every recipient,
    serialized once.

    Each session's C{message} notify (L{frame}) is the shared bytes behind a
    few bytes of its own (its inbox seq and outgoing flag), put together
    without protobuf objects; the start of the frame is cached per length
    of the seq's varint, so a fan-out builds it once or twice.

    @ivar data: the serialized L{pb.Message} (what the gate bus carries to
        other gates, once per message per gate).
    """

    __slots__ = (
        "_message",
        "data",
        "_tail",
        "_outgoingTail",
        "_starts",
        "_streamStarts",
        "jsonCache",
    )

    def __init__(self, message: pb.Message | None = None, data: bytes | None = None) -> None:
        """
        @param message: the L{pb.Message}; or L{None} with C{data}.
        @param data: its serialization, if already at hand.
        """
        if data is None:
            # Without data, message is given.
            data = message.SerializeToString()  # type: ignore[union-attr]
        self._message = message
        self.data = data
        self._tail = _ENTRY_MESSAGE + varint(len(data)) + data
        self._outgoingTail = _ENTRY_OUTGOING + self._tail
        # What comes before the seq, by the seq's varint length (negative:
        # outgoing), shared by every frame of this message.
        self._starts: dict[int, bytes] = {}
        # The same behind the frame's length prefix (L{streamFrame}).
        self._streamStarts: dict[int, bytes] = {}
        #: The message in the JSON form of WebSocket clients, made by the
        #: first one (L{imserver.web.jsonframes}).
        self.jsonCache: str | None = None

    @classmethod
    def fromBytes(cls, data: bytes) -> "EncodedMessage":
        """
        A message serialized elsewhere (another gate, through the gate bus):
        the bytes are used as they are, parsed only if L{message} is asked
        for.
        """
        return cls(data=data)

    @property
    def message(self) -> pb.Message:
        """
        The L{pb.Message}.
        """
        if self._message is None:
            self._message = pb.Message.FromString(self.data)
        return self._message

    def frame(self, seq: int, outgoing: bool) -> bytes:
        """
        The C{message} NOTIFY frame of inbox entry C{seq}.

        @rtype: L{bytes}
        """
        seqBytes = varint(seq)
        key = -len(seqBytes) if outgoing else len(seqBytes)
        start = self._starts.get(key)
        tail = self._outgoingTail if outgoing else self._tail
        if start is None:
            start = self._start(key, len(seqBytes), tail)
        return b"".join((start, seqBytes, tail))

    def streamFrame(self, seq: int, outgoing: bool) -> bytes:
        """
        L{frame} behind its length prefix, as a stream transport (TCP)
        writes it: the same bytes as C{packLength(len(frame)) + frame},
        without a second copy (the prefix is cached with the start).

        @rtype: L{bytes}
        """
        seqBytes = varint(seq)
        key = -len(seqBytes) if outgoing else len(seqBytes)
        start = self._streamStarts.get(key)
        tail = self._outgoingTail if outgoing else self._tail
        if start is None:
            bare = self._starts.get(key) or self._start(key, len(seqBytes), tail)
            start = self._streamStarts[key] = (
                packLength(len(bare) + len(seqBytes) + len(tail)) + bare
            )
        return b"".join((start, seqBytes, tail))

    def _start(self, key: int, seqLength: int, tail: bytes) -> bytes:
        # The entry's size depends on the seq only through the length of its
        # varint, so the frame's start is shared by all those seqs.
        size = 1 + seqLength + len(tail)
        start = self._starts[key] = _NOTIFY_MESSAGE + varint(size) + _ENTRY_SEQ
        return start


class ClosesWithError:
    """
    The close with an ERROR frame, shared by everything that writes frames
    (the TCP framing, the gate's session): a class combined with it has
    C{writeFrame(data)}, C{close()}, C{_closing}, C{connectionId} and a
    C{log}.
    """

    if TYPE_CHECKING:
        log: Logger
        connectionId: str
        _closing: bool

        def writeFrame(self, data: bytes) -> None: ...

        def close(self) -> None: ...

    def closeWithError(self, code: "pb.ErrorCode", message: str, seq: int = 0) -> None:
        """
        Send an ERROR frame and close: further input is ignored.
        Idempotent.

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
        self.writeFrame(encodeError(code, message, seq))
        self.close()
