# -*- test-case-name: tests.test_chat -*-
"""
When to tell the peer (or the group) that the user is typing: the C{typing}
signals L{imserver.chat.session.ChatSession} sends, as rare as
docs/protocol.md (section 7.4) asks (L{TypingSignals}).
"""

#: While the user types, "still typing" is sent again every this many
#: seconds (below L{imserver.chat.session.TYPING_INTERVAL}, so the peer
#: keeps one indicator).
TYPING_REFRESH = 2.5
#: A line left alone this many seconds sends "stopped typing".
TYPING_IDLE = 5.0
#: No two typing signals closer than this (1 / the server's default
#: C{--typing-rate}), except a stop right after a start, which the server
#: always lets through (docs/protocol.md, section 7.4).
TYPING_MIN_GAP = 0.5


class TypingSignals:
    """
    The C{typing} signals of the user at the terminal: a start, a refresh
    every C{refresh} seconds while typing goes on, a stop when the line is
    sent or emptied (L{stop}) or after C{idle} seconds without a key, and
    never two signals closer than L{TYPING_MIN_GAP} but for a stop after a
    start.
    """

    def __init__(self, clock, send, refresh=TYPING_REFRESH, idle=TYPING_IDLE):
        """
        @param clock: an L{IReactorTime}.
        @param send: sends a signal: called with C{True} (typing) or
            C{False} (stopped), returns whether it was sent.
        @param refresh: seconds between two starts while typing goes on.
        @param idle: seconds without a key that stop the typing.
        """
        self.clock = clock
        self.send = send
        self.refresh = refresh
        self.idle = idle
        # Whether the peer was told so, when a signal was last sent (and a
        # start), the timer of the stop after idling.
        self._active = False
        self._sentAt = float("-inf")
        self._startedAt = float("-inf")
        self._idleTimer = None

    def typing(self):
        """
        The user typed on a line not sent yet (that is not blank): tell the
        peer, unless it was told recently; stop after C{idle} seconds
        without a call.
        """
        if self._idleTimer is not None and self._idleTimer.active():
            self._idleTimer.reset(self.idle)
        else:
            self._idleTimer = self.clock.callLater(self.idle, self._idled)
        now = self.clock.seconds()
        if self._active and now - self._startedAt < self.refresh:
            return
        if now - self._sentAt < TYPING_MIN_GAP:
            return
        if self.send(True):
            self._active = True
            self._sentAt = self._startedAt = now

    def stop(self):
        """
        The line was sent or emptied, or the chat is over: tell the peer,
        if it was told of a start.
        """
        if self._idleTimer is not None:
            if self._idleTimer.active():
                self._idleTimer.cancel()
            self._idleTimer = None
        if self._active:
            self._active = False
            if self.send(False):
                self._sentAt = self.clock.seconds()

    def _idled(self):
        self._idleTimer = None
        self.stop()
