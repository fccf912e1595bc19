# -*- test-case-name: tests.test_chat -*-
"""
The chat's terminal: standard input read as lines (L{TerminalInput}), or a
terminal read key by key (L{RawTerminal}) with the line edited and echoed
here (L{TerminalEditor}), so that the session learns when the user starts
typing; and the text stream the session prints to (L{TransportText}).
L{openTerminal} picks the input.
"""

import os
import signal
import unicodedata

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

#: The longest input line accepted, in bytes (the server's own limit on a
#: message body is lower by default and reported as a failed send).
MAX_LINE_LENGTH = 64 * 1024


@implementer(IHalfCloseableProtocol)
class TerminalInput(LineReceiver):
    """
    Lines from standard input, handed to a
    L{imserver.chat.session.ChatSession}.  End of input hands over a last
    unterminated line, then calls C{inputEnded}.  A line longer than
    C{MAX_LENGTH} is dropped whole, with a note.  Data that ends in a line
    not blank and not complete yet calls C{typing}.

    Half-closeable, so that standard output stays open after end of input.

    @ivar closed: a L{Deferred} firing when standard input and output are
        both closed.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE_LENGTH

    def __init__(self, session=None):
        self.session = session
        self.closed = Deferred()
        self._discarding = False
        self._leftover = b""

    def dataReceived(self, data):
        """
        Split C{data} into lines, skipping the rest of a too long line; a
        partial line (not blank) is the user typing.
        """
        partial = data.rpartition(self.delimiter)[2].strip()
        while data:
            if self._discarding:
                _, newline, data = data.partition(self.delimiter)
                if not newline:
                    return
                self._discarding = False
            LineReceiver.dataReceived(self, data)
            data, self._leftover = self._leftover, b""
        if partial and not self._discarding:
            self.session.typing()

    def lineReceived(self, line):
        self.session.lineReceived(line)

    def lineLengthExceeded(self, data):
        """
        Drop the too long line at the start of C{data}: the lines after it
        are handled once L{LineReceiver.dataReceived} returns, the rest of
        the line is skipped as it arrives.
        """
        self.session.show("! not sent: a line longer than {} bytes".format(self.MAX_LENGTH))
        _, newline, rest = data.partition(self.delimiter)
        if newline:
            self._leftover = rest
        else:
            self._discarding = True

    def readConnectionLost(self):
        """
        End of input: hand over an unterminated last line, then the end.
        """
        last = self.clearLineBuffer()
        if last and not self._discarding:
            self.session.lineReceived(last)
        self.session.inputEnded()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        if not self.closed.called:
            self.closed.callback(None)

    def finish(self):
        """
        The session is over; nothing to tidy on the terminal.
        """


def displayWidth(text):
    """
    The columns C{text} takes on a terminal: 2 for wide (East Asian)
    characters, 0 for combining ones, 1 for the others.
    """
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


class TerminalEditor(TerminalInput):
    """
    Keys from a terminal in non-canonical mode without echo
    (L{RawTerminal}), edited into lines here, so the session learns when the
    user starts typing a line, not only when it is sent.

    Characters are echoed and added to the line; Enter sends it (the
    session gets C{lineReceived}); the terminal's erase key (Backspace)
    removes the last character, its kill key (Ctrl-U) the line, its word
    erase key (Ctrl-W) the last word; its end-of-file key (Ctrl-D) on an
    empty line ends the input.  Other control characters and escape
    sequences (arrow keys...) are ignored; at C{MAX_LENGTH} bytes further
    characters are refused with a bell.  Ctrl-C, Ctrl-Z and Ctrl-\\ stay
    signals (the terminal keeps C{ISIG}).

    The session writes through L{write}, which prints above the line being
    edited, then redraws it.
    """

    ESCAPE = 0x1B

    def __init__(
        self,
        session=None,
        erase=(b"\x7f", b"\x08"),
        kill=(b"\x15",),
        wordErase=(b"\x17",),
        endOfFile=(b"\x04",),
    ):
        """
        @param erase: the keys (single bytes) erasing a character; likewise
            C{kill} (the line), C{wordErase} (a word) and C{endOfFile}.
        """
        TerminalInput.__init__(self, session)
        self._keys = {}
        for action, keys in (
            ("erase", erase),
            ("kill", kill),
            ("wordErase", wordErase),
            ("endOfFile", endOfFile),
        ):
            for key in keys:
                self._keys.setdefault(key[0], action)
        self._line = bytearray()
        self._escape = None
        self._afterCR = False
        self._ended = False

    def dataReceived(self, data):
        """
        Edit the line with the keys in C{data}.
        """
        if self._ended:
            return
        echo = bytearray()
        typed = erased = False
        for byte in data:
            if self._escape is not None:
                self._escapeByte(byte)
                continue
            afterCR, self._afterCR = self._afterCR, byte == 0x0D
            if byte in (0x0A, 0x0D):
                if byte == 0x0A and afterCR:
                    continue
                self.transport.write(bytes(echo) + b"\n")
                del echo[:]
                line, self._line = bytes(self._line), bytearray()
                typed = erased = False
                self.session.lineReceived(line)
                if self._ended:
                    return
                continue
            action = self._keys.get(byte)
            if action == "endOfFile":
                if not self._line:
                    self.transport.write(bytes(echo))
                    self._ended = True
                    self.session.inputEnded()
                    return
            elif action is not None:
                if self._line:
                    echo += self._erase(action)
                    erased = True
            elif byte == self.ESCAPE:
                self._escape = b""
            elif byte < 0x20 and byte != 0x09:
                pass
            elif len(self._line) >= self.MAX_LENGTH:
                echo += b"\x07"
            else:
                self._line.append(byte)
                echo.append(byte)
                typed = True
        if echo:
            self.transport.write(bytes(echo))
        if self._line.strip():
            if typed:
                self.session.typing()
        elif erased:
            self.session.typingStopped()

    def _escapeByte(self, byte):
        # ESC [ ... final (CSI), ESC O x (SS3), ESC x (Alt+x): all ignored.
        sequence = self._escape + bytes([byte])
        if sequence in (b"[", b"O"):
            self._escape = sequence
        elif sequence[:1] == b"[" and len(sequence) > 1 and not 0x40 <= byte <= 0x7E:
            self._escape = sequence if len(sequence) < 32 else None
        else:
            self._escape = None

    def _erase(self, action):
        """
        Remove the last character, word or the whole line.

        @return: what erases it on the screen.
        """
        line = self._line
        end = len(line)
        if action == "kill":
            start = 0
        elif action == "wordErase":
            start = end
            while start > 0 and line[start - 1] in b" \t":
                start -= 1
            while start > 0 and line[start - 1] not in b" \t":
                start -= 1
        else:
            start = max(end - 1, 0)
            while start > 0 and line[start] & 0xC0 == 0x80:
                start -= 1
        gone = bytes(line[start:]).decode("utf-8", "replace")
        del line[start:]
        if "\t" in gone:
            return b"\r\x1b[K" + bytes(line)
        width = displayWidth(gone)
        return b"\b" * width + b" " * width + b"\b" * width

    def write(self, data):
        """
        Print C{data} (whole lines) above the line being edited.
        """
        if self._line:
            self.transport.write(b"\r\x1b[K" + data + bytes(self._line))
        else:
            self.transport.write(data)

    def redraw(self):
        """
        Draw the line being edited again (after the terminal was used by
        someone else: the shell, after Ctrl-Z).
        """
        self.transport.write(b"\r\x1b[K" + bytes(self._line))

    def readConnectionLost(self):
        """
        The terminal is gone: the line being edited was never sent.
        """
        if not self._ended:
            self._ended = True
            self.session.inputEnded()

    def finish(self):
        """
        The session is over: leave the line being edited on the screen, on
        its own line.
        """
        if self._line:
            self.transport.write(b"\n")
            del self._line[:]


class RawTerminal:
    """
    A terminal read key by key: non-canonical mode without echo (for
    L{TerminalEditor}), output processing and signals kept; and restored.
    """

    def __init__(self, fd):
        """
        @param fd: the terminal's file descriptor.
        """
        self.fd = fd
        self._saved = None

    @property
    def entered(self):
        """
        Whether the terminal is (to be) read key by key: L{enter} was
        called, L{restore} not yet.
        """
        return self._saved is not None

    def enter(self):
        """
        Save the terminal's mode and switch to key-by-key reading.

        @return: the keyword arguments of L{TerminalEditor} for the
            terminal's own erase, kill, word erase and end-of-file keys
            (added to the usual ones).
        @raise termios.error: if C{fd} is not a terminal.
        """
        import termios

        self._saved = termios.tcgetattr(self.fd)
        self.apply()
        keys = {}
        for name, index, usual in (
            ("erase", termios.VERASE, (b"\x7f", b"\x08")),
            ("kill", termios.VKILL, (b"\x15",)),
            ("wordErase", termios.VWERASE, (b"\x17",)),
            ("endOfFile", termios.VEOF, (b"\x04",)),
        ):
            key = self._saved[6][index]
            own = (key,) if isinstance(key, bytes) and key not in (b"", b"\x00") else ()
            keys[name] = own + usual
        return keys

    def apply(self):
        """
        (Again) set key-by-key reading, from the mode saved by L{enter}.
        """
        import termios

        mode = self._saved[:6] + [list(self._saved[6])]
        mode[3] &= ~(termios.ICANON | termios.ECHO)
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        termios.tcsetattr(self.fd, termios.TCSANOW, mode)

    def restore(self):
        """
        Put the saved mode back (once).
        """
        import termios

        saved, self._saved = self._saved, None
        if saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
            except termios.error:
                pass


class TransportText:
    """
    A text stream over a transport: what
    L{imserver.chat.session.ChatSession} prints goes through the reactor,
    which owns (non-blocking) standard output.
    """

    def __init__(self, transport, encoding="utf-8"):
        self.transport = transport
        self.encoding = encoding

    def write(self, text):
        self.transport.write(text.encode(self.encoding, "replace"))

    def flush(self):
        pass


def openTerminal(reactor, typing, stdin, stdout):
    """
    The input protocol: a L{TerminalEditor} on a L{RawTerminal} when
    C{typing} signals are wanted and standard input and output are a terminal
    (restored at reactor shutdown at the latest, set again after Ctrl-Z and
    C{fg}), else a L{TerminalInput}.

    @return: C{(RawTerminal or None, protocol, function undoing the SIGCONT
        handler)}.
    """
    if not (typing and os.isatty(stdin) and os.isatty(stdout)):
        return None, TerminalInput(), lambda: None
    try:
        import termios
    except ImportError:  # pragma: no cover (not POSIX)
        return None, TerminalInput(), lambda: None
    raw = RawTerminal(stdin)
    try:
        keys = raw.enter()
    except termios.error:
        return None, TerminalInput(), lambda: None
    reactor.addSystemEventTrigger("after", "shutdown", raw.restore)
    editor = TerminalEditor(**keys)

    def continued():
        if raw.entered:
            raw.apply()
            editor.redraw()

    previous = signal.signal(
        signal.SIGCONT, lambda signum, frame: reactor.callFromThread(continued)
    )

    def restoreSignal():
        signal.signal(signal.SIGCONT, previous)

    return raw, editor, restoreSignal
