# -*- test-case-name: tests.test_chat -*-
"""
C{python -m imserver chat}: talk to one user, or in a group, from a terminal.

    python -m imserver chat --uid alice --to bob
    python -m imserver chat --uid alice --group team

Each line typed is sent to the peer (or the group); what arrives is printed
as C{[HH:MM:SS] sender: text}, or C{[HH:MM:SS] sender in group: text} for a
group message, and system notices as C{[HH:MM:SS] notice: text}.  In a
group, the members are listed once connected.  The connection is an
L{IMClient}: it reconnects by itself, resumes where it left off and re-sends
unanswered messages.  Ctrl-D waits (briefly) for the server to confirm what
was sent, then quits.

While the user types a line the peer (or the group) gets C{typing}
signals: one when the line starts, again every L{TYPING_REFRESH} seconds
while it goes on, and a stop when it is sent, erased, or left alone for
L{TYPING_IDLE} seconds.  To see the line start, a terminal is read key by
key (L{RawTerminal}, L{TerminalEditor}: this package echoes and edits the
line); other input (a pipe) is read as it comes (L{TerminalInput}), and a
partial line counts as typing.  C{--no-typing} sends no signals and leaves
the terminal as it is.

A certificate the chat does not trust (or that does not name the host)
ends it with a hint (C{--ca}, C{--data-dir}, C{--host}) instead of retrying
forever, unless C{--keep-trying}.

By default it finds the server the way C{make run} starts it: TLS on
localhost:7443, trusting C{<data-dir>/tls-cert.pem}, with a token minted
from the server secret (C{--secret-file}, else C{$IMSERVER_SECRET}, else
C{<data-dir>/secret}).

The global reactor is only imported inside L{main}; L{ChatSession} takes
the reactor, the client and the output stream as arguments.

The modules, each using only those above it:

  - L{imserver.chat.options}: the options, the token and the certificate
    to trust (L{ChatOptions}, L{prepare});
  - L{imserver.chat.failures}: why something failed, in words, and what to
    do about a refused certificate (L{describe}, L{certificateProblem});
  - L{imserver.chat.typingsignal}: when to send C{typing} signals;
  - L{imserver.chat.session}: the chat itself (L{ChatSession});
  - L{imserver.chat.terminal}: standard input as lines, or a terminal read
    key by key with the line edited here;
  - L{imserver.chat.app}: the client, the terminal and the session put
    together (L{run}, L{main}).

This package gives every name of them others use.
"""

from imserver.chat.app import (
    MAX_RECONNECT_DELAY,
    OUTPUT_FLUSH_TIMEOUT,
    _WatchedEndpoint as _WatchedEndpoint,
    main,
    run,
)
from imserver.chat.failures import (
    UNTRUSTED,
    WRONG_NAME,
    certificateHint,
    certificateProblem,
    describe,
)
from imserver.chat.options import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    MINTED_TOKEN_TTL,
    ChatConfig,
    ChatOptions,
    defaultDeviceId,
    prepare,
)
from imserver.chat.session import (
    DRAIN_TIMEOUT,
    ROLE_MARKS,
    SYSTEM_SENDER,
    TYPING_INTERVAL,
    ChatSession,
    bodyText,
    clientMsgIdPrefix,
    printable,
)
from imserver.chat.terminal import (
    MAX_LINE_LENGTH,
    RawTerminal,
    TerminalEditor,
    TerminalInput,
    TransportText,
    displayWidth,
    openTerminal,
)
from imserver.chat.typingsignal import (
    TYPING_IDLE,
    TYPING_MIN_GAP,
    TYPING_REFRESH,
    TypingSignals,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DRAIN_TIMEOUT",
    "MAX_LINE_LENGTH",
    "MAX_RECONNECT_DELAY",
    "MINTED_TOKEN_TTL",
    "OUTPUT_FLUSH_TIMEOUT",
    "ROLE_MARKS",
    "SYSTEM_SENDER",
    "TYPING_IDLE",
    "TYPING_INTERVAL",
    "TYPING_MIN_GAP",
    "TYPING_REFRESH",
    "UNTRUSTED",
    "WRONG_NAME",
    "ChatConfig",
    "ChatOptions",
    "ChatSession",
    "RawTerminal",
    "TerminalEditor",
    "TerminalInput",
    "TransportText",
    "TypingSignals",
    "bodyText",
    "certificateHint",
    "certificateProblem",
    "clientMsgIdPrefix",
    "defaultDeviceId",
    "describe",
    "displayWidth",
    "main",
    "openTerminal",
    "prepare",
    "printable",
    "run",
]
