# -*- test-case-name: tests.test_docs -*-
"""
Tests that docs/protocol.md names exactly what the code has: the methods
and notifications of L{imserver.methods}, the C{ErrorCode} and C{KickReason}
values of proto/im.proto (L{imserver.pb.im_pb2}), and no enum value that
does not exist or with a wrong number.

The document is read the way it is written: the tables of sections 6
(methods), 7 (notifications), 7.1 (kick reasons) and 12 (error codes), the
headings of sections 6.x and 7.x, the contents, and, for mentions in the
text, every upper-case name in backticks, every upper-case name with an
underscore, and the name after C{RESPONSE} or C{ERROR} in the diagrams.
Also: the TLS cipher suites of section 1 are in the server's order of
preference, and the server enforces it.
"""

import re

from OpenSSL import SSL, crypto
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from imserver import methods, tls
from imserver.pb import im_pb2 as pb
from imserver.rpc import Method, Notification

PROTOCOL = FilePath(__file__).parent().parent().child("docs").child("protocol.md")

#: Upper-case names in backticks that are not protocol names: TLS cipher
#: suites, OpenSSL options, socket options, environment variables...
NOT_PROTOCOL_PATTERN = re.compile(r"^(TLS|SSL|SO|TCP|IMSERVER)_")
#: ... and single names from other vocabularies (a Redis error reply, an
#: errno).
NOT_PROTOCOL_NAMES = frozenset({"NOSCRIPT", "ECONNRESET"})

_HEADING = re.compile(r"^(#{2,6})\s+(\d+(?:\.\d+)*)\.?\s+(.*?)\s*$")
_FENCE = re.compile(r"^\s*```")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_BACKTICKED = re.compile(r"`([^`\n]+)`")
_ENUM_LIKE = re.compile(r"^[A-Z][A-Z0-9_]+$")
_UNDERSCORED = re.compile(r"(?<![A-Za-z0-9_])[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+(?![A-Za-z0-9_])")
_DIAGRAM_CODE = re.compile(r"\b(?:RESPONSE|ERROR)\s+([A-Z][A-Z0-9_]+)(?![A-Za-z0-9_])")
_NUMBERED_MENTIONS = [
    # `NAME` (3   `NAME` = 3   `NAME` 3
    re.compile(r"`([A-Z][A-Z0-9_]+)`\s*(?:\(|=\s*)?(\d+)"),
    # | `NAME` | 3 |
    re.compile(r"\|\s*`([A-Z][A-Z0-9_]+)`\s*\|\s*(\d+)\s*\|"),
]
# | 3 | `NAME` |
_VALUE_THEN_NAME = re.compile(r"\|\s*(\d+)\s*\|\s*`([A-Z][A-Z0-9_]+)`\s*\|")


def protocolText():
    """
    @return: docs/protocol.md as text.
    """
    return PROTOCOL.getContent().decode("utf-8")


def headings(text):
    """
    @return: C{[(line index, level, number, title)]} of the numbered
        headings outside code blocks (C{## 6. Methods} is C{(i, 2, "6",
        "Methods")}).
    """
    found = []
    inCode = False
    for i, line in enumerate(text.splitlines()):
        if _FENCE.match(line):
            inCode = not inCode
            continue
        if not inCode:
            match = _HEADING.match(line)
            if match:
                found.append((i, len(match.group(1)), match.group(2), match.group(3)))
    return found


def section(text, number):
    """
    The text of a numbered section from its heading to the next heading
    (so C{"6"} is the introduction of section 6, before C{6.1}).

    @raise KeyError: if there is no such section.
    """
    lines = text.splitlines()
    found = headings(text)
    for position, (i, _level, n, _title) in enumerate(found):
        if n == number:
            end = found[position + 1][0] if position + 1 < len(found) else len(lines)
            return "\n".join(lines[i + 1 : end])
    raise KeyError("docs/protocol.md has no section {}".format(number))


def subsectionNames(text, number):
    """
    The names in backticks in the titles of the subsections of C{number}
    (C{### 6.1 `auth`} gives C{auth}).

    @return: C{{name: subsection number}}
    """
    names = {}
    for _i, _level, n, title in headings(text):
        if n.startswith(number + ".") and n.count(".") == number.count(".") + 1:
            for name in _BACKTICKED.findall(title):
                names[name] = n
    return names


def tables(chunk):
    """
    The Markdown tables of C{chunk}.

    @return: a list of C{(header, rows)}: the header cells, and each row as a
        list of cells (text with the surrounding spaces removed; a C{\\|}
        inside a cell does not split it).
    """
    result = []
    block = []
    for line in chunk.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            block.append(line.strip())
            continue
        if len(block) >= 2 and re.match(r"^\|(\s*:?-+:?\s*\|)+$", block[1]):
            cells = [_cells(row) for row in block]
            result.append((cells[0], cells[2:]))
        block = []
    return result


def _cells(row):
    parts = _CELL_SPLIT.split(row)
    return [cell.strip() for cell in parts[1:-1]]


def findTable(testCase, chunk, where, columns):
    """
    The table of C{chunk} whose header begins with C{columns}; fails the
    test if there is none.

    @return: its rows, each a C{{column: cell}} dictionary.
    """
    for header, rows in tables(chunk):
        if header[: len(columns)] == list(columns):
            return [dict(zip(header, row)) for row in rows]
    testCase.fail(
        "docs/protocol.md {}: no table with the columns {} (found: {})".format(
            where,
            " | ".join(columns),
            "; ".join(" | ".join(header) for header, _ in tables(chunk)) or "no table",
        )
    )


def enumValues():
    """
    Every value of every enum of proto/im.proto (top-level and nested).

    @return: C{{value name: (enum name, number)}}
    """
    values = {}

    def add(enum):
        for value in enum.values:
            values[value.name] = (enum.name, value.number)

    def walk(message):
        for enum in message.enum_types:
            add(enum)
        for nested in message.nested_types:
            walk(nested)

    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        add(enum)
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        walk(message)
    return values


def declared(kind):
    """
    @param kind: L{Method} or L{Notification}.
    @return: C{{name: object}} of those declared in L{imserver.methods}.
    """
    return {value.name: value for value in vars(methods).values() if isinstance(value, kind)}


class DocumentationTestCase(SynchronousTestCase):
    """
    Comparisons between a set the code has and a set the document names.
    """

    def setUp(self):
        self.text = protocolText()

    def assertSameNames(self, documented, actual, what, where, source):
        """
        Fail, naming both differences, unless C{documented} and C{actual}
        hold the same names.

        @param what: what the names are ("error codes").
        @param where: where the document names them ("section 12 table").
        @param source: where the code has them ("ErrorCode in proto/im.proto").
        """
        documented, actual = set(documented), set(actual)
        problems = []
        extra = sorted(documented - actual)
        missing = sorted(actual - documented)
        if extra:
            problems.append(
                "docs/protocol.md ({}) names {} that {} does not have: {}".format(
                    where, what, source, ", ".join(extra)
                )
            )
        if missing:
            problems.append(
                "{} has {} that docs/protocol.md ({}) does not document: {}".format(
                    source, what, where, ", ".join(missing)
                )
            )
        if problems:
            self.fail("\n".join(problems))

    def assertSameMapping(self, documented, actual, what, where):
        """
        Fail unless every name in both C{documented} and C{actual} maps to
        the same value.
        """
        wrong = [
            "{}: documented {}, the code has {}".format(name, documented[name], actual[name])
            for name in sorted(set(documented) & set(actual))
            if documented[name] != actual[name]
        ]
        if wrong:
            self.fail(
                "docs/protocol.md ({}) gives wrong {}:\n  {}".format(
                    where, what, "\n  ".join(wrong)
                )
            )


class MethodTests(DocumentationTestCase):
    """
    Sections 6 and 7 list exactly the methods and notifications of
    L{imserver.methods}, with their message types.
    """

    def test_methodTable(self):
        """
        The table of section 6 has a row per L{Method}, with its request and
        response message types, and no other row.
        """
        rows = findTable(
            self, section(self.text, "6"), "section 6", ["Name", "Direction", "Request", "Response"]
        )
        documented = {}
        for row in rows:
            for name in _BACKTICKED.findall(row["Name"]):
                documented[name] = (row["Request"].strip("`"), row["Response"].strip("`"))
        actual = declared(Method)
        self.assertSameNames(
            documented, actual, "methods", "section 6 table", "imserver/methods.py"
        )
        self.assertSameMapping(
            documented,
            {
                name: (m.requestType.DESCRIPTOR.name, m.responseType.DESCRIPTOR.name)
                for name, m in actual.items()
            },
            "(request, response) types",
            "section 6 table",
        )

    def test_notificationTable(self):
        """
        The table of section 7 has a row per L{Notification}, with its
        message type, and no other row.
        """
        rows = findTable(
            self, section(self.text, "7"), "section 7", ["Name", "Direction", "Message"]
        )
        documented = {}
        for row in rows:
            for name in _BACKTICKED.findall(row["Name"]):
                documented[name] = row["Message"].strip("`")
        actual = declared(Notification)
        self.assertSameNames(
            documented, actual, "notifications", "section 7 table", "imserver/methods.py"
        )
        self.assertSameMapping(
            documented,
            {name: n.messageType.DESCRIPTOR.name for name, n in actual.items()},
            "message types",
            "section 7 table",
        )

    def test_methodSections(self):
        """
        Every method has a subsection of section 6 titled with its name, and
        every such subsection is a method.
        """
        self.assertSameNames(
            subsectionNames(self.text, "6"),
            declared(Method),
            "methods",
            "headings 6.x",
            "imserver/methods.py",
        )

    def test_notificationSections(self):
        """
        Every notification has a subsection of section 7 titled with its
        name, and every such subsection is a notification.
        """
        self.assertSameNames(
            subsectionNames(self.text, "7"),
            declared(Notification),
            "notifications",
            "headings 7.x",
            "imserver/methods.py",
        )

    def test_contents(self):
        """
        The contents list the methods after section 6 and the notifications
        after section 7.
        """
        for number, title, kind in [("6", "Methods", Method), ("7", "Notifications", Notification)]:
            match = re.search(
                r"^{}\. \[{}\]\([^)]*\):(.*)$".format(number, title), self.text, re.MULTILINE
            )
            self.assertIsNotNone(match, "the contents have no line for section {}".format(number))
            self.assertSameNames(
                _BACKTICKED.findall(match.group(1)),
                declared(kind),
                title.lower(),
                "contents, section {}".format(number),
                "imserver/methods.py",
            )


class EnumTests(DocumentationTestCase):
    """
    Sections 7.1 and 12 list exactly the C{KickReason} and C{ErrorCode}
    values, with their numbers, and the text names no enum value the proto
    does not have.
    """

    def test_errorCodeTable(self):
        """
        The table of section 12 has a row per C{ErrorCode} value, with its
        number, and no other row.
        """
        rows = findTable(self, section(self.text, "12"), "section 12", ["Code", "#"])
        documented = {}
        for row in rows:
            for name in _BACKTICKED.findall(row["Code"]):
                documented[name] = int(row["#"]) if row["#"].isdigit() else row["#"]
        actual = dict(pb.ErrorCode.items())
        self.assertSameNames(
            documented, actual, "error codes", "section 12 table", "ErrorCode in proto/im.proto"
        )
        self.assertSameMapping(documented, actual, "numbers", "section 12 table")

    def test_kickReasonTable(self):
        """
        The table of section 7.1 has a row per C{KickReason} value, with its
        number, and no other row.  (A row may name several values, and may
        add words such as "unknown"; its value cell starts with the
        number.)
        """
        rows = findTable(self, section(self.text, "7.1"), "section 7.1", ["Value", "Name"])
        documented = {}
        for row in rows:
            number = re.match(r"\d+", row["Value"])
            for name in _BACKTICKED.findall(row["Name"]):
                documented[name] = int(number.group()) if number else row["Value"]
        actual = dict(pb.KickReason.items())
        self.assertSameNames(
            documented, actual, "kick reasons", "section 7.1 table", "KickReason in proto/im.proto"
        )
        self.assertSameMapping(documented, actual, "numbers", "section 7.1 table")

    def mentions(self):
        """
        The upper-case names the document uses as protocol names.

        @return: C{[(line number, name)]}
        """
        found = []
        inCode = False
        for number, line in enumerate(self.text.splitlines(), 1):
            if _FENCE.match(line):
                inCode = not inCode
                continue
            names = set(_UNDERSCORED.findall(line))
            if inCode:
                names.update(_DIAGRAM_CODE.findall(line))
            else:
                names.update(name for name in _BACKTICKED.findall(line) if _ENUM_LIKE.match(name))
            found.extend((number, name) for name in sorted(names))
        return found

    def test_enumMentions(self):
        """
        Every upper-case name the text uses (in backticks, with an
        underscore, or after C{RESPONSE}/C{ERROR} in a diagram) is a value
        of an enum of proto/im.proto, so the document mentions no error
        code or kick reason that does not exist.
        """
        values = enumValues()
        mentions = self.mentions()
        self.assertGreater(len(mentions), 100, "the mentions were not found")
        unknown = [
            "line {}: {}".format(number, name)
            for number, name in mentions
            if name not in values
            and name not in NOT_PROTOCOL_NAMES
            and not NOT_PROTOCOL_PATTERN.match(name)
        ]
        if unknown:
            self.fail(
                "docs/protocol.md names values that no enum of proto/im.proto has ({}):\n  {}"
                "\n(if a name is not meant as a protocol name, add it to NOT_PROTOCOL_NAMES"
                " in tests/test_docs.py)".format(
                    ", ".join(sorted({enum for enum, _ in values.values()})), "\n  ".join(unknown)
                )
            )

    def test_enumNumbers(self):
        """
        Wherever the text gives an enum value with its number (C{`NAME`
        (3}, C{`NAME` = 3}, C{`NAME` 3}, or in a table row C{| `NAME` | 3
        |} or C{| 3 | `NAME` |}), the number is the proto's.
        """
        values = enumValues()
        checked = 0
        wrong = []
        for number, line in enumerate(self.text.splitlines(), 1):
            pairs = [
                (name, value)
                for pattern in _NUMBERED_MENTIONS
                for name, value in pattern.findall(line)
            ]
            pairs += [(name, value) for value, name in _VALUE_THEN_NAME.findall(line)]
            for name, value in pairs:
                if name in values:
                    checked += 1
                    enum, actual = values[name]
                    if int(value) != actual:
                        wrong.append(
                            "line {}: {} {}, but {}.{} = {}".format(
                                number, name, value, enum, name, actual
                            )
                        )
        self.assertGreater(checked, 30, "the numbered mentions were not found")
        if wrong:
            self.fail("docs/protocol.md gives wrong enum numbers:\n  " + "\n  ".join(wrong))


class ParserTests(SynchronousTestCase):
    """
    The Markdown helpers read what the document writes.
    """

    def test_tables(self):
        """
        L{tables} returns each table's header and rows; an escaped pipe
        stays inside its cell, and lines that only start like a table are
        not one.
        """
        chunk = "\n".join(
            [
                "intro",
                "| A | B |",
                "|---|---|",
                "| `x` | a \\| b |",
                "| y | z |",
                "",
                "| not | a table |",
                "text",
            ]
        )
        self.assertEqual(tables(chunk), [(["A", "B"], [["`x`", "a \\| b"], ["y", "z"]])])

    def test_sectionAndSubsections(self):
        """
        L{section} returns the text up to the next heading, skipping
        headings inside code blocks; L{subsectionNames} reads the backticked
        names of the direct subsections only.
        """
        text = "\n".join(
            [
                "## 6. Methods",
                "intro",
                "```",
                "## 9. not a heading",
                "```",
                "### 6.1 `auth`",
                "body",
                "#### 6.1.1 `deeper`",
                "### 6.2 `ping` (both)",
                "## 7. Next",
            ]
        )
        self.assertEqual(section(text, "6"), "intro\n```\n## 9. not a heading\n```")
        self.assertEqual(subsectionNames(text, "6"), {"auth": "6.1", "ping": "6.2"})
        self.assertRaises(KeyError, section, text, "9")


def handshake(serverContext, clientCiphers, trusted):
    """
    A TLS 1.2 handshake in memory (no socket) between C{serverContext} and
    a client offering only C{clientCiphers}, in that order.

    @param trusted: the server's certificate (PEM), the client's only trust
        root.
    @return: the name of the suite the server chose.
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(":".join(clientCiphers).encode("ascii"))
    context.get_cert_store().add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, trusted))
    context.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
    client = SSL.Connection(context, None)
    client.set_connect_state()
    server = SSL.Connection(serverContext, None)
    server.set_accept_state()
    for _ in range(10):
        for this, other in ((client, server), (server, client)):
            try:
                this.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                other.bio_write(this.bio_read(65536))
            except SSL.WantReadError:
                pass
        if server.get_cipher_name() and client.get_cipher_name():
            break
    return server.get_cipher_name()


class CipherOrderTests(SynchronousTestCase):
    """
    Section 1 lists the TLS cipher suites in the order the server prefers
    them (L{tls.serverOptions}), and that order wins over the client's.
    """

    def setUp(self):
        self.certificate, key = tls.makeSelfSigned()
        self.context = tls.serverOptions(self.certificate, key).getContext()
        self.serverOrder = SSL.Connection(self.context, None).get_cipher_list()
        rows = findTable(self, section(protocolText(), "1"), "section 1", ["Property", "Value"])
        self.rows = {row["Property"]: row["Value"] for row in rows}

    def documented(self, prop, prefix):
        """
        The suites named in the row C{prop} of section 1's table that start
        with C{prefix}, in the order they are first named.
        """
        names = [name for name in _BACKTICKED.findall(self.rows[prop]) if name.startswith(prefix)]
        return list(dict.fromkeys(names))

    def test_tls12Order(self):
        """
        The TLS 1.2 row names the ECDSA suites (the generated certificate's)
        in the server's order, and the RSA suites come in the same order.
        """
        documented = self.documented("TLS 1.2 cipher suites", "ECDHE-ECDSA-")
        self.assertEqual(documented, [n for n in self.serverOrder if n.startswith("ECDHE-ECDSA-")])
        self.assertEqual(
            [n.replace("ECDHE-ECDSA-", "ECDHE-RSA-") for n in documented],
            [n for n in self.serverOrder if n.startswith("ECDHE-RSA-")],
        )

    def test_tls13Order(self):
        """
        The TLS 1.3 row names OpenSSL's TLS 1.3 suites in the server's order.
        """
        self.assertEqual(
            self.documented("TLS 1.3 cipher suites", "TLS_"),
            [n for n in self.serverOrder if n.startswith("TLS_")],
        )

    def test_serverPreferenceWins(self):
        """
        A client offering two documented TLS 1.2 suites, the less preferred
        first, gets the one the document lists first.
        """
        documented = self.documented("TLS 1.2 cipher suites", "ECDHE-ECDSA-")
        self.assertEqual(len(documented), 3)
        for better, worse in zip(documented, documented[1:]):
            self.assertEqual(handshake(self.context, [worse, better], self.certificate), better)
        self.assertEqual(
            handshake(self.context, [documented[-1]], self.certificate), documented[-1]
        )
