# -*- test-case-name: tests.test_jsonframes -*-
"""
The C{imserver.v1.json} form of frames: one WebSocket text message holds one
L{pb.Frame} in protobuf's canonical JSON mapping, except that C{body} is not
base64 bytes but the JSON object of the method's own message type (its
canonical JSON too), so that a browser needs no protobuf library.

docs/protocol.md (section 17) is the normative description; the examples
there are computed by this module and checked by the tests.
"""

import json
from typing import TYPE_CHECKING

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from imserver import methods
from imserver.pb import im_pb2 as pb
from imserver.rpc import Method, Notification

if TYPE_CHECKING:
    from imserver.wire import EncodedMessage

#: The two WebSocket subprotocols, by what a client offers in
#: C{Sec-WebSocket-Protocol}.
PROTO = "imserver.v1.proto"
JSON = "imserver.v1.json"
SUBPROTOCOLS = (PROTO, JSON)

#: How much longer than the frame limit a JSON text message may be: the
#: JSON form of a frame is longer than its protobuf form (names, base64,
#: escapes).  The frame it encodes is then held to the limit itself.
JSON_EXPANSION = 4

#: Every method and notification, by name.
METHODS: dict[str, Method] = {m.name: m for m in vars(methods).values() if isinstance(m, Method)}
NOTIFICATIONS: dict[str, Notification] = {
    n.name: n for n in vars(methods).values() if isinstance(n, Notification)
}

_KIND_NAMES = {value: name for name, value in pb.Kind.items()}
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class JSONFrameError(ValueError):
    """
    A text message is not a frame in the JSON form (answered with
    C{BAD_FRAME}).
    """


def _toDict(message: Message) -> dict[str, object]:
    return json_format.MessageToDict(message)


def _parse(value: object, message: Message, where: str) -> None:
    if not isinstance(value, dict):
        raise JSONFrameError("{} is not a JSON object".format(where))
    try:
        json_format.ParseDict(value, message)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as e:
        raise JSONFrameError("{}: {}".format(where, e)) from None


def _bodyType(frame: pb.Frame, answers: Method | None = None) -> type[Message] | None:
    """
    The message type of C{frame}'s body: its method's request type for a
    REQUEST, its notification's type for a NOTIFY, the response type of
    C{answers} (the method of the request it answers) for a RESPONSE;
    L{None} for an unknown method or any other kind.
    """
    if frame.kind == pb.REQUEST:
        method = METHODS.get(frame.method)
        return method.requestType if method is not None else None
    if frame.kind == pb.NOTIFY:
        notification = NOTIFICATIONS.get(frame.method)
        return notification.messageType if notification is not None else None
    if frame.kind == pb.RESPONSE and answers is not None:
        return answers.responseType
    return None


def decodeFrame(text: str | bytes) -> pb.Frame:
    """
    Parse one frame in the JSON form.

    The body of a C{REQUEST} of a known method is parsed as that method's
    request type, the body of a C{NOTIFY} of a known notification as its
    message type; a body anywhere else is not read (an unknown method is
    answered C{UNKNOWN_METHOD}, an unknown notification ignored, as in the
    protobuf form).

    @param text: the text message (UTF-8 L{bytes} or L{str}).
    @raise JSONFrameError: if it is not JSON, not an object, or does not map
        onto L{pb.Frame} and the body's type (unknown field, wrong type).
    """
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise JSONFrameError("not JSON: {}".format(e)) from None
    if not isinstance(value, dict):
        raise JSONFrameError("a frame is a JSON object")
    body = value.pop("body", None)
    for name in ("kind", "seq"):
        if isinstance(value.get(name), bool):
            raise JSONFrameError("frame: {} is not a boolean".format(name))
    frame = pb.Frame()
    _parse(value, frame, "frame")
    if body is not None:
        bodyType = _bodyType(frame)
        if bodyType is not None:
            message = bodyType()
            _parse(body, message, "body of {}".format(frame.method))
            frame.body = message.SerializeToString()
    return frame


class JSONFrameEncoder:
    """
    Turns the frames one connection's session writes (serialized
    L{pb.Frame}s, from L{imserver.wire}) into the JSON form.

    A response carries no method name, so the body of a response is typed
    by the request it answers: L{requestReceived} remembers the method of
    each request the connection received until its response is encoded.
    """

    def __init__(self) -> None:
        self._methods: dict[int, Method] = {}

    def requestReceived(self, frame: pb.Frame) -> None:
        """
        Remember the method of the REQUEST C{frame} for its response.
        """
        method = METHODS.get(frame.method)
        if method is not None:
            self._methods[frame.seq] = method

    def encode(self, data: bytes) -> str:
        """
        The JSON form of the serialized frame C{data}.
        """
        frame = pb.Frame.FromString(data)
        out: dict[str, object] = {"kind": _KIND_NAMES.get(frame.kind, frame.kind)}
        if frame.seq:
            out["seq"] = frame.seq
        if frame.method:
            out["method"] = frame.method
        answers = self._methods.pop(frame.seq, None) if frame.kind == pb.RESPONSE else None
        bodyType = _bodyType(frame, answers)
        if frame.HasField("error"):
            out["error"] = _toDict(frame.error)
        elif bodyType is not None:
            try:
                out["body"] = _toDict(bodyType.FromString(frame.body))
            except DecodeError:
                pass
        return _dumps(out)  # type: ignore[no-any-return]

    def encodeMessage(self, encoded: "EncodedMessage", seq: int, outgoing: bool) -> str:
        """
        The JSON form of the C{message} push of inbox entry C{seq}: the
        message's own JSON is made once for all its recipients (cached on
        C{encoded}) and only the entry around it per connection.
        """
        text = encoded.jsonCache
        if text is None:
            text = encoded.jsonCache = _dumps(_toDict(encoded.message))
        return '{"kind":"NOTIFY","method":"message","body":{"seq":"%d",%s"message":%s}}' % (
            seq,
            '"outgoing":true,' if outgoing else "",
            text,
        )


def encodeJSON(data: bytes, requestMethod: str | None = None) -> str:
    """
    The JSON form of the serialized frame C{data}, for documents and tests;
    C{requestMethod} names the method a RESPONSE answers.
    """
    encoder = JSONFrameEncoder()
    if requestMethod is not None:
        frame = pb.Frame.FromString(data)
        encoder.requestReceived(pb.Frame(kind=pb.REQUEST, seq=frame.seq, method=requestMethod))
    return encoder.encode(data)
