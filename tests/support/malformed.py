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
bytes to the TLS port) defaults to the file's C{listeners}, else
C{["tcp"]}.  A bulk entry makes one case per
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
raw listeners only); the server must then close cleanly too.
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

#: Where the cases are.
DATA = FilePath(__file__).parent().sibling("data").child("malformed")

_STATES = frozenset(["new", "authenticated"])
_LISTENERS = frozenset(["tcp", "ssl", "ssl-raw"])
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
    """

    OTHER_SECRET = b"not-the-gate-secret-not-the-gate"

    def __init__(self, secret, now, uid):
        self.secret = secret
        self.now = now
        self.uid = uid

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
    if "frame" in spec:
        data = encodeFrameSpec(spec["frame"], context)
        return struct.pack("!I", len(data)) + data
    if "framed" in spec:
        data = encodeBytes(spec["framed"], context)
        return struct.pack("!I", len(data)) + data
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
    Turn a case's C{send} list into steps: C{("data", bytes)} and
    C{("pause", seconds)}.
    """
    steps = []
    for item in items:
        if "await" in item:
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
    """

    frames: list
    then: str
    tls: bool = False
    probe: str = None
    alert: int = None

    def __str__(self):
        if self.tls:
            return "only a TLS alert, then closed"
        frames = ", ".join(str(f) for f in self.frames) or "no frame"
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
        return buildSend(self.send, context)


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
    if expect.get("closed") == "tls":
        return Expectation([], "closed", tls=True, alert=expect.get("alert"))
    if expect.get("closed"):
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
        if client not in (None, "halfClose"):
            raise DataError("{}: {}: unknown client action".format(kind, entry["name"]))
        if client == "halfClose" and "ssl" in listeners:
            raise DataError("{}: {}: halfClose needs a raw listener".format(kind, entry["name"]))
        if state == "authenticated" and "ssl-raw" in listeners:
            raise DataError("{}: {}: ssl-raw cannot authenticate".format(kind, entry["name"]))
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
                    entry["send"],
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
