# -*- test-case-name: tests.test_malformed -*-
"""
The data of the malformed-input suite (C{tests/data/malformed/*.json}):
loading its cases (L{loadCases}) and building the bytes each sends
(L{Case.steps}, with a L{BuildContext}).  L{tests.test_malformed} runs
them against a live gate; C{fuzz/build_corpus.py} turns them into the
fuzzer's seed corpus.

The data format (one file per kind of input; readable, so a case can be
reviewed against docs/protocol.md by eye)::

    {"kind": "length_prefix",
     "description": "what these inputs have in common",
     "cases": [
       {"name": "zero length", "state": "new",
        "listeners": ["tcp", "ssl"],
        "send": [{"hex": "00 00 00 00"}],
        "expect": {"error": "EMPTY_FRAME"}}],
     "bulk": [
       {"name": "length {n} before auth", "state": "new",
        "each": {"n": [4097, 65536, 4294967295]},
        "send": [{"length": "{n}"}],
        "expect": {"error": "FRAME_TOO_LARGE"}}]}

C{state} is C{"new"} (a fresh connection) or C{"authenticated"} (the
runner, L{tests.test_malformed}, authenticates first, as a user of its
own, with seq 1).
C{listeners} (C{"tcp"}; C{"ssl"}, through verified TLS; C{"ssl-raw"}, raw
bytes to the TLS port; C{"ws"} and C{"ws-json"}, the gate's web listener
after an upgrade offering C{imserver.v1.proto} or C{imserver.v1.json};
C{"web"}, the web listener before any upgrade, for cases that send their
own) defaults to the file's C{listeners}, else C{["tcp"]}.  On C{ws} a
C{frame} or C{framed} is one binary message (docs/protocol.md section
17.3), so a case that sends only whole frames (C{frame}, C{framed}, and
C{repeat}, C{concat} and C{split} of them, with C{await} and C{pause})
means the same on C{tcp} and C{ws}, with the same expectation; a case on
both must be such a case.  A bulk entry makes one case per
value of its C{each} list, substituting C{{name}} in every string (a string
that is only C{{name}} becomes the value itself, a number stays a number).

What C{send} holds, in order (each item written separately)::

    {"hex": "00 00 00 0a ..."}      raw bytes
    {"text": "GET / HTTP/1.1\\r\\n"} raw UTF-8 text
    {"length": 4097}                a 4-byte big-endian length prefix only
    {"frame": FRAME}                one frame, encoded with encodeFrame
    {"framed": BYTES}               BYTES with its correct length prefix
    {"repeat": ITEM, "times": 101}  ITEM that many times, in one write
    {"pause": 0.05}                 wait before writing the next item
    {"await": 1}                    wait (a second at most) until that many
                                    frames (pushes aside) have arrived
    {"clientHello": "TLSv1.3"}      a real TLS ClientHello from OpenSSL
                                    (also TLSv1.2, TLSv1.1, TLSv1)

and on the web listeners (RFC 6455; every client frame masked with one
fixed key unless it says otherwise)::

    {"frame": FRAME, "fragments": 3}  (on ws) one binary message in that
                                    many frames (default 1); "framed" too
    {"binary": BYTES}               one binary message; "fragments" too
    {"json": VALUE}                 one text message, VALUE as JSON ("$uid"
                                    and "$token", a valid token, filled in);
                                    "fragments" too
    {"ws": {"opcode": "text", "fin": true, "rsv": 0, "mask": true,
            "code": 1000, "payload": BYTES, "length": 4097, "lengthSize": 8}}
                                    one frame built by hand: opcode
                                    continuation, text, binary, close, ping,
                                    pong or a number; "code" a close code
                                    before the payload; "length" the length
                                    the header announces, "lengthSize" the
                                    size of its extended field (0, 2, 8;
                                    default: the smallest, as the RFC says)
    {"upgrade": {"path": "/ws", "method": "GET", "version": "HTTP/1.1",
                 "headers": {"Origin": "https://x", ...}}}
                                    (on "web" only) an upgrade request
                                    offering imserver.v1.proto, each header
                                    given replacing the default one of that
                                    name or added (null: left out); the
                                    runner waits for the answer

A FRAME is C{{"kind": "REQUEST", "seq": 1, "method": "ping", "body":
BYTES, "error": {"code": "BAD_FRAME", "message": "..."}, "padTo": N}}
(C{padTo} appends an unknown bytes field so the frame is exactly N bytes,
prefix excluded).  BYTES is a string (UTF-8), C{{"hex"}}, C{{"text"}},
C{{"repeat": BYTES, "times": N}}, C{{"concat": [BYTES, ...]}}, a protobuf
message C{{"message": "SendRequest", "fields": {"to": "bob", ...}}} (bytes
fields take a BYTES; a token field may be C{{"token": "valid"}},
C{"expired"}, C{"otherSecret"} or C{{"token": "valid", "uid": "mallory"}}),
or raw wire format C{{"wire": [[1, "varint", 1], [3, "bytes", BYTES],
[6, "fixed32", 0], [7, "fixed64", 0], [8, "group", [...]], [9, "start"],
[9, "end"]]}} for what protobuf cannot encode (invalid UTF-8, wrong wire
types).

C{expect} is one of::

    {"error": "EMPTY_FRAME", "seq": 0}     ERROR frame, then a clean close
    {"response": {"seq": 1, "error": "NOT_AUTHENTICATED"}}
    {"response": {"seq": 1, "ok": true}, "then": "closed"}
    {"frames": [SPEC, ...], "then": "open"}  several, in order; a SPEC is
        {"kind": "RESPONSE", "seq": 2, "error": CODE | "ok": true,
         "count": [min, max]} or {"kind": "ERROR", "code": CODE, "seq": N}
    {"closed": true}          no frame, a clean close
    {"closed": "tls"}         only TLS records (an alert, or nothing), closed
    {"closed": "tls", "alert": 70}   exactly one alert record, of that
                              description (70: protocol_version)
    {"open": true}            nothing; the connection stays and answers ping
    {"close": 1002}           (WebSocket) no frame, a close frame of that code
    {"status": 403}           (web) the upgrade answered with that HTTP status,
                              nothing checked after it unless "then":
                              "closed" (the gate must close)

Over WebSocket every close is the closing handshake, of code 4000 + the
code of the ERROR frame before it (4001 after BAD_FRAME), else 1000
(docs/protocol.md section 17.5); C{"close": N} says another.  The close
frame's code is checked, not how TCP ends after it (the gate drops it once
the handshake is done).  A case on C{web} may add C{"subprotocol":
"imserver.v1.json"}: the one the upgrade must choose.

A case may carry C{"knownBug": {"description": ..., "logs": ["OverflowError"]}}
when the gate departs from docs/protocol.md because of a reported bug: it
runs with its documented expectation, its outcome goes to the report, not
to the failures, and the errors it logs (C{logs}) are expected.  Its input
in fuzz/regressions/ checks deterministically that the bug is still there
(L{tests.test_malformed.FuzzHarnessTests}).

C{"then"} is C{"open"} (the default after responses: the runner then sends
a C{ping} and needs its answer, C{NOT_AUTHENTICATED} in state C{new}
unless C{"probe"} says otherwise) or C{"closed"}.  Server pushes
(C{message}, C{typing}, C{notice}) are ignored.  A case may end with
C{"client": "halfClose"} (shut the write side down after sending, on the
raw listeners only); the server must then close cleanly too.  On the web
listeners the runner answers the gate's close frame (the closing
handshake) unless the case says C{"client": "noCloseReply"}.
"""

import base64
import json
import struct
from dataclasses import dataclass, field

from google.protobuf.descriptor import FieldDescriptor
from OpenSSL import SSL
from twisted.python.filepath import FilePath

from imserver.auth import mintToken, validateUid
from imserver.errors import BadRequest
from imserver.pb import im_pb2 as pb

from tests.support.websocket import (
    CLOSE_ERROR_BASE,
    CLOSE_NORMAL,
    MASK_KEY,
    OPCODES,
    PROTO,
    clientFrame,
    upgradeRequest,
)

#: Where the cases are.
DATA = FilePath(__file__).parent().sibling("data").child("malformed")

_STATES = frozenset(["new", "authenticated"])
#: The listeners of the web listener (C{--web}): WebSocket, each frame one
#: message (docs/protocol.md section 17).
WEB_LISTENERS = frozenset(["ws", "ws-json", "web"])
#: The listeners where a frame has its 4-byte length prefix.
_LENGTH_PREFIXED = frozenset(["tcp", "ssl"])
_LISTENERS = _LENGTH_PREFIXED | {"ssl-raw"} | WEB_LISTENERS
_CLIENT_ACTIONS = {"halfClose": {"tcp", "ssl-raw"}, "noCloseReply": WEB_LISTENERS}
_TLS_VERSIONS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}
_WIRE_TYPES = {"varint": 0, "fixed64": 1, "bytes": 2, "start": 3, "end": 4, "fixed32": 5}


class DataError(ValueError):
    """
    A case in the data files is not well formed.
    """


# -- building bytes ------------------------------------------------------------


class BuildContext:
    """
    What building a case's bytes needs besides its data: the secret and the
    clock for tokens, and the uid the case authenticates as.

    @ivar secret: the gate's token secret.
    @ivar now: the Unix time tokens are minted at.
    @ivar uid: the case's own uid.
    @ivar listener: the listener the bytes are for: a frame is length
        prefixed on C{tcp} and C{ssl}, one binary message on the web
        listeners.
    """

    OTHER_SECRET = b"not-the-gate-secret-not-the-gate"

    def __init__(self, secret, now, uid, listener="tcp"):
        self.secret = secret
        self.now = now
        self.uid = uid
        self.listener = listener

    def on(self, listener):
        """
        The same context for the bytes of C{listener}.
        """
        return BuildContext(self.secret, self.now, self.uid, listener)

    def frame(self, data, fragments=1):
        """
        One serialized frame as the listener carries it: after its length
        prefix, or as one binary message (in that many fragments).
        """
        if self.listener in WEB_LISTENERS:
            return webSocketMessage(OPCODES["binary"], data, fragments)
        if fragments != 1:
            raise DataError("fragments of a frame on {}".format(self.listener))
        return struct.pack("!I", len(data)) + data

    def token(self, spec, uid):
        """
        A token as a case names it.

        @param spec: C{"valid"}, C{"expired"} or C{"otherSecret"}.
        @param uid: the uid it is minted for.
        """
        try:
            validateUid(uid)
        except BadRequest:
            # A case whose uid is refused before the token is looked at.
            uid = self.uid
        if spec == "valid":
            return mintToken(self.secret, uid, 3600, self.now)
        if spec == "expired":
            return mintToken(self.secret, uid, 1, self.now - 10)
        if spec == "otherSecret":
            return mintToken(self.OTHER_SECRET, uid, 3600, self.now)
        raise DataError("unknown token {!r}".format(spec))


def _varint(value):
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encodeWire(items, context):
    """
    Raw protobuf wire format from C{[[field, type, value], ...]}.
    """
    out = []
    for item in items:
        number, kind = item[0], item[1]
        if kind == "group":
            out.append(_varint(number << 3 | 3))
            out.append(encodeWire(item[2], context))
            out.append(_varint(number << 3 | 4))
            continue
        if kind not in _WIRE_TYPES:
            raise DataError("unknown wire type {!r}".format(kind))
        out.append(_varint(number << 3 | _WIRE_TYPES[kind]))
        if kind == "varint":
            out.append(_varint(item[2]))
        elif kind == "fixed32":
            out.append(struct.pack("<I", item[2] & 0xFFFFFFFF))
        elif kind == "fixed64":
            out.append(struct.pack("<Q", item[2] & 0xFFFFFFFFFFFFFFFF))
        elif kind == "bytes":
            value = encodeBytes(item[2], context)
            out.append(_varint(len(value)) + value)
    return b"".join(out)


def _fieldValue(descriptor, value, context, fields):
    if isinstance(value, dict) and "token" in value:
        return context.token(value["token"], value.get("uid", fields.get("uid", context.uid)))
    if descriptor.type == FieldDescriptor.TYPE_BYTES:
        return encodeBytes(value, context)
    if descriptor.type == FieldDescriptor.TYPE_STRING and isinstance(value, dict):
        return encodeBytes(value, context).decode("utf-8")
    return value


def encodeMessage(name, fields, context):
    """
    A serialized C{imserver.v1} message.
    """
    cls = getattr(pb, name, None)
    if cls is None:
        raise DataError("no message {!r}".format(name))
    descriptors = cls.DESCRIPTOR.fields_by_name
    fields = {key: context.uid if value == "$uid" else value for key, value in fields.items()}
    values = {}
    for key, value in fields.items():
        if key not in descriptors:
            raise DataError("{} has no field {!r}".format(name, key))
        values[key] = _fieldValue(descriptors[key], value, context, fields)
    return cls(**values).SerializeToString()


def encodeBytes(spec, context):
    """
    The bytes a BYTES item of the data describes.
    """
    if spec == "$uid":
        return context.uid.encode("utf-8")
    if isinstance(spec, str):
        return spec.encode("utf-8")
    if not isinstance(spec, dict):
        raise DataError("not a bytes item: {!r}".format(spec))
    if "hex" in spec:
        return bytes.fromhex(spec["hex"])
    if "text" in spec:
        return spec["text"].encode("utf-8")
    if "base64" in spec:
        return base64.b64decode(spec["base64"])
    if "repeat" in spec:
        return encodeBytes(spec["repeat"], context) * spec["times"]
    if "concat" in spec:
        return b"".join(encodeBytes(item, context) for item in spec["concat"])
    if "message" in spec:
        return encodeMessage(spec["message"], spec.get("fields", {}), context)
    if "length" in spec:
        return struct.pack("!I", spec["length"])
    fragments = spec.get("fragments", 1)
    if "frame" in spec:
        return context.frame(encodeFrameSpec(spec["frame"], context), fragments)
    if "framed" in spec:
        return context.frame(encodeBytes(spec["framed"], context), fragments)
    if "ws" in spec:
        return encodeWebSocketFrame(spec["ws"], context)
    if "binary" in spec:
        return webSocketMessage(OPCODES["binary"], encodeBytes(spec["binary"], context), fragments)
    if "json" in spec:
        text = json.dumps(_jsonValue(spec["json"], context), ensure_ascii=False)
        return webSocketMessage(OPCODES["text"], text.encode("utf-8"), fragments)
    if "clientHello" in spec:
        return clientHello(spec["clientHello"])
    if "wire" in spec:
        return encodeWire(spec["wire"], context)
    raise DataError("not a bytes item: {!r}".format(spec))


def encodeFrameSpec(spec, context):
    """
    The serialized L{pb.Frame} (no length prefix) a FRAME item describes.
    """
    frame = pb.Frame()
    kind = spec.get("kind", "REQUEST")
    frame.kind = pb.Kind.Value(kind) if isinstance(kind, str) else kind
    if "seq" in spec:
        frame.seq = spec["seq"]
    if "method" in spec:
        method = spec["method"]
        frame.method = (
            method if isinstance(method, str) else encodeBytes(method, context).decode("utf-8")
        )
    if "body" in spec:
        frame.body = encodeBytes(spec["body"], context)
    if "error" in spec:
        error = spec["error"]
        code = error.get("code", 0)
        frame.error.code = pb.ErrorCode.Value(code) if isinstance(code, str) else code
        message = error.get("message", "")
        frame.error.message = (
            message if isinstance(message, str) else encodeBytes(message, context).decode("utf-8")
        )
    data = frame.SerializeToString()
    if "extra" in spec:
        data += encodeBytes(spec["extra"], context)
    if "padTo" in spec:
        data = _padTo(data, spec["padTo"])
    return data


def encodeWebSocketFrame(spec, context):
    """
    The WebSocket frame a C{ws} item describes.
    """
    keys = {"opcode", "fin", "rsv", "mask", "code", "payload", "length", "lengthSize"}
    if set(spec) - keys:
        raise DataError("unknown keys {} in a WebSocket frame".format(set(spec) - keys))
    opcode = spec.get("opcode", "binary")
    if isinstance(opcode, str):
        if opcode not in OPCODES:
            raise DataError("unknown opcode {!r}".format(opcode))
        opcode = OPCODES[opcode]
    payload = encodeBytes(spec.get("payload", ""), context)
    if "code" in spec:
        payload = struct.pack("!H", spec["code"]) + payload
    return clientFrame(
        opcode,
        payload,
        fin=spec.get("fin", True),
        rsv=spec.get("rsv", 0),
        mask=MASK_KEY if spec.get("mask", True) else None,
        length=spec.get("length"),
        lengthSize=spec.get("lengthSize"),
    )


def webSocketMessage(opcode, payload, fragments=1):
    """
    One WebSocket message of a client in C{fragments} frames, their
    payloads of (nearly) equal size.
    """
    cuts = [len(payload) * i // fragments for i in range(fragments + 1)]
    return b"".join(
        clientFrame(
            opcode if i == 0 else OPCODES["continuation"],
            payload[cuts[i] : cuts[i + 1]],
            fin=i == fragments - 1,
        )
        for i in range(fragments)
    )


def _jsonValue(value, context):
    # A JSON value with "$uid" and "$token" (a valid one) filled in.
    if value == "$uid":
        return context.uid
    if value == "$token":
        return context.token("valid", context.uid)
    if isinstance(value, list):
        return [_jsonValue(v, context) for v in value]
    if isinstance(value, dict):
        return {k: _jsonValue(v, context) for k, v in value.items()}
    return value


def _padTo(data, size):
    # Field 15, bytes: tag 0x7a, a varint length, the padding.
    for lengthSize in range(1, 6):
        padding = size - len(data) - 1 - lengthSize
        if padding >= 0 and len(_varint(padding)) == lengthSize:
            return data + b"\x7a" + _varint(padding) + b"\0" * padding
    raise DataError("cannot pad {} bytes to {}".format(len(data), size))


def clientHello(version):
    """
    The first flight of a real TLS client (OpenSSL) limited to C{version},
    as it would go on the wire.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    if _TLS_VERSIONS[version] < SSL.TLS1_2_VERSION:
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    context.set_min_proto_version(_TLS_VERSIONS[version])
    context.set_max_proto_version(_TLS_VERSIONS[version])
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    connection.set_tlsext_host_name(b"localhost")
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(65536)


def buildSend(items, context):
    """
    Turn a case's C{send} list into steps: C{("data", bytes)},
    C{("pause", seconds)}, C{("await", frames)} and C{("upgrade", bytes)}.
    """
    steps = []
    for item in items:
        if "upgrade" in item:
            steps.append(("upgrade", encodeUpgrade(item["upgrade"], context)))
        elif "await" in item:
            steps.append(("await", int(item["await"])))
        elif "pause" in item and "split" not in item:
            steps.append(("pause", float(item["pause"])))
        elif "split" in item:
            data = encodeBytes(item["split"], context)
            size = -(-len(data) // item["parts"])
            for start in range(0, len(data), size):
                if start:
                    steps.append(("pause", float(item.get("pause", 0.01))))
                steps.append(("data", data[start : start + size]))
        else:
            steps.append(("data", encodeBytes(item, context)))
    return steps


def encodeUpgrade(spec, context):
    """
    The upgrade request an C{upgrade} item describes.
    """
    unknown = set(spec) - {"path", "headers", "method", "version"}
    if unknown:
        raise DataError("unknown keys {} in an upgrade".format(unknown))
    headers = {
        name.encode("ascii"): None if value is None else encodeBytes(value, context)
        for name, value in spec.get("headers", {}).items()
    }
    return upgradeRequest(
        path=spec.get("path", "/ws").encode("utf-8"),
        protocols=[PROTO],
        headers=headers,
        method=spec.get("method", "GET").encode("ascii"),
        version=spec.get("version", "HTTP/1.1").encode("ascii"),
    )


def _carriesFrames(item):
    # Whether a send item (or BYTES) is made of whole frames only.
    if not isinstance(item, dict):
        return False
    if "frame" in item or "framed" in item:
        return True
    if "repeat" in item:
        return _carriesFrames(item["repeat"])
    if "concat" in item:
        return all(_carriesFrames(part) for part in item["concat"])
    if "split" in item:
        return _carriesFrames(item["split"])
    return False


def carriesFrames(send):
    """
    Whether a C{send} list is whole frames only (with C{await}s and
    C{pause}s), so that it means the same over WebSocket, each frame one
    binary message (docs/protocol.md section 17.3).
    """
    data = [item for item in send if "await" not in item and set(item) != {"pause"}]
    return bool(data) and all(_carriesFrames(item) for item in data)


# -- loading cases -------------------------------------------------------------


@dataclass
class FrameSpec:
    """
    One expected frame (or run of frames).
    """

    kind: int
    seq: object = 0  # an int, or None for any
    code: int = None  # an ErrorCode, or None for a success RESPONSE
    count: tuple = (1, 1)

    def matches(self, frame):
        if frame.kind != self.kind:
            return False
        if self.seq is not None and frame.seq != self.seq:
            return False
        if self.code is None:
            return not frame.HasField("error")
        return frame.error.code == self.code

    def __str__(self):
        what = pb.Kind.Name(self.kind)
        if self.code is not None:
            what += " " + pb.ErrorCode.Name(self.code)
        elif self.kind == pb.RESPONSE:
            what += " ok"
        if self.seq is not None:
            what += " seq {}".format(self.seq)
        if self.count != (1, 1):
            what += " x{}..{}".format(*self.count)
        return what


@dataclass
class Expectation:
    """
    A case's normalized expectation.

    @ivar frames: L{FrameSpec}s, in order.
    @ivar then: C{"open"} or C{"closed"}.
    @ivar tls: only a TLS alert (or nothing) may arrive, no frames.
    @ivar probe: the answer expected to the probe C{ping}: C{"ok"} or an
        error code name.
    @ivar close: the WebSocket close code, if not the one L{closeCode}
        derives.
    @ivar status: the HTTP status of a refused upgrade, or L{None}.
    @ivar subprotocol: the subprotocol an upgrade must choose, or L{None}.
    """

    frames: list
    then: str
    tls: bool = False
    probe: str = None
    alert: int = None
    close: int = None
    status: int = None
    subprotocol: str = None

    def closeCode(self):
        """
        The WebSocket close code of a close (docs/protocol.md section
        17.5): C{close} if given, else 4000 + the code of a final ERROR
        frame, else 1000.
        """
        if self.close is not None:
            return self.close
        if self.frames and self.frames[-1].kind == pb.ERROR:
            return CLOSE_ERROR_BASE + self.frames[-1].code
        return CLOSE_NORMAL

    def __str__(self):
        if self.tls:
            return "only a TLS alert, then closed"
        if self.status is not None:
            return "HTTP {}, then {}".format(self.status, self.then)
        frames = ", ".join(str(f) for f in self.frames) or "no frame"
        if self.then == "closed" and self.close is not None:
            return "{}, then close {}".format(frames, self.close)
        return "{}, then {}".format(frames, self.then)


@dataclass
class Case:
    """
    One case of the malformed-input suite.
    """

    kind: str
    name: str
    state: str
    listener: str
    send: list
    expect: Expectation
    client: str = None
    knownBug: dict = None
    source: str = ""
    index: int = field(default=0, compare=False)

    @property
    def title(self):
        return "{}: {} [{}, {}]".format(self.kind, self.name, self.state, self.listener)

    def steps(self, context):
        """
        The steps of L{buildSend}, with the bytes of the case's listener.
        """
        return buildSend(self.send, context.on(self.listener))


def _code(name):
    try:
        return pb.ErrorCode.Value(name)
    except ValueError:
        raise DataError("unknown error code {!r}".format(name))


def _frameSpec(spec):
    kind = pb.Kind.Value(spec.get("kind", "RESPONSE"))
    seq = spec.get("seq", 0)
    if seq == "any":
        seq = None
    code = spec.get("error", spec.get("code"))
    if code is None and not spec.get("ok"):
        raise DataError("frame spec {!r} needs error or ok".format(spec))
    count = spec.get("count", 1)
    if isinstance(count, int):
        count = (count, count)
    return FrameSpec(kind, seq, None if code is None else _code(code), tuple(count))


def normalizeExpectation(expect, state):
    """
    Turn the short forms of C{expect} into an L{Expectation}.
    """
    expectation = _expectation(expect, state)
    expectation.subprotocol = expect.get("subprotocol")
    if "close" in expect:
        if expectation.then != "closed":
            raise DataError("a close code with {!r}".format(expect))
        expectation.close = expect["close"]
    return expectation


def _expectation(expect, state):
    probe = expect.get("probe", "ok" if state == "authenticated" else "NOT_AUTHENTICATED")
    if "error" in expect:
        frames = [FrameSpec(pb.ERROR, expect.get("seq", 0), _code(expect["error"]))]
        return Expectation(frames, "closed")
    if "response" in expect:
        spec = dict(expect["response"], kind="RESPONSE")
        then = expect.get("then", "open")
        return Expectation([_frameSpec(spec)], then, probe=probe)
    if "frames" in expect:
        frames = [_frameSpec(spec) for spec in expect["frames"]]
        then = expect.get("then", "open")
        if frames and frames[-1].kind == pb.ERROR:
            then = "closed"
        return Expectation(frames, then, probe=probe)
    if "status" in expect:
        return Expectation([], expect.get("then", "answered"), status=expect["status"])
    if expect.get("closed") == "tls":
        return Expectation([], "closed", tls=True, alert=expect.get("alert"))
    if expect.get("closed") or "close" in expect:
        return Expectation([], "closed")
    if expect.get("open"):
        return Expectation([], "open", probe=probe)
    raise DataError("unknown expectation {!r}".format(expect))


def _substitute(value, variables):
    if isinstance(value, str):
        for name, replacement in variables.items():
            if value == "{" + name + "}":
                return replacement
        return value.format(**variables) if "{" in value else value
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    return value


def _expandBulk(entry):
    each = entry.get("each")
    if not each or len(each) != 1:
        raise DataError("bulk entry {!r} needs one 'each' variable".format(entry.get("name")))
    [(name, values)] = each.items()
    template = {k: v for k, v in entry.items() if k != "each"}
    for value in values:
        shown = (
            value if not isinstance(value, str) else value.encode("unicode_escape").decode("ascii")
        )
        case = _substitute(template, {name: value})
        case["name"] = template["name"].format(**{name: shown})
        yield case


def loadKind(path):
    """
    The cases of one data file.

    @type path: L{FilePath}
    @rtype: L{list} of L{Case}
    """
    document = json.loads(path.getContent())
    kind = document["kind"]
    if kind != path.basename()[: -len(".json")]:
        raise DataError("{}: kind {!r} is not the file name".format(path.path, kind))
    raw = list(document.get("cases", []))
    for entry in document.get("bulk", []):
        raw.extend(_expandBulk(entry))
    cases = []
    for entry in raw:
        unknown = set(entry) - {
            "name",
            "state",
            "listeners",
            "send",
            "expect",
            "client",
            "comment",
            "knownBug",
        }
        if unknown:
            raise DataError("{}: {}: unknown keys {}".format(kind, entry.get("name"), unknown))
        state = entry.get("state", "new")
        if state not in _STATES:
            raise DataError("{}: {}: unknown state {!r}".format(kind, entry["name"], state))
        listeners = entry.get("listeners", document.get("listeners", ["tcp"]))
        if set(listeners) - _LISTENERS:
            raise DataError("{}: {}: unknown listener".format(kind, entry["name"]))
        client = entry.get("client")
        if client is not None and client not in _CLIENT_ACTIONS:
            raise DataError("{}: {}: unknown client action".format(kind, entry["name"]))
        if client is not None and set(listeners) - _CLIENT_ACTIONS[client]:
            raise DataError("{}: {}: {} not on {}".format(kind, entry["name"], client, listeners))
        if state == "authenticated" and {"ssl-raw", "web"} & set(listeners):
            raise DataError("{}: {}: cannot authenticate there".format(kind, entry["name"]))
        send = entry["send"]
        upgrades = any("upgrade" in item for item in send)
        if upgrades and set(listeners) != {"web"} or "web" in listeners and not upgrades:
            raise DataError("{}: {}: upgrade items go on web".format(kind, entry["name"]))
        if "ws" in listeners and _LENGTH_PREFIXED & set(listeners) and not carriesFrames(send):
            raise DataError("{}: {}: on ws and tcp, whole frames only".format(kind, entry["name"]))
        expect = normalizeExpectation(entry["expect"], state)
        knownBug = entry.get("knownBug")
        if knownBug is not None and not knownBug.get("description"):
            raise DataError("{}: {}: knownBug needs a description".format(kind, entry["name"]))
        for listener in listeners:
            cases.append(
                Case(
                    kind,
                    entry["name"],
                    state,
                    listener,
                    send,
                    expect,
                    client,
                    knownBug,
                    path.basename(),
                )
            )
    return cases


def loadCases(directory=DATA):
    """
    Every case of every data file in C{directory}, in file order; each has
    a distinct C{index}.

    @rtype: L{list} of L{Case}
    """
    cases = []
    for path in sorted(directory.globChildren("*.json")):
        cases.extend(loadKind(path))
    for index, case in enumerate(cases):
        case.index = index
    return cases


def streamCases(directory=DATA):
    """
    The cases of the gate's own listeners (C{tcp}, C{ssl}, C{ssl-raw}):
    their bytes are the stream a L{imserver.protocol.GateProtocol} reads,
    as the fuzz harness (fuzz/harness.py) feeds it.  The web listener's
    are WebSocket frames and HTTP, for another protocol.

    @rtype: L{list} of L{Case}
    """
    return [case for case in loadCases(directory) if case.listener not in WEB_LISTENERS]
