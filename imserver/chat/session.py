# -*- test-case-name: tests.test_chat -*-
"""
One chat (L{ChatSession}): lines typed go to the peer or the group, what
arrives is printed; and how received text is made safe to print
(L{printable}, L{bodyText}).
"""

import hashlib
import time
import unicodedata
import uuid

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from imserver.chat.failures import certificateHint, certificateProblem, describe
from imserver.chat.typingsignal import TYPING_IDLE, TYPING_REFRESH, TypingSignals
from imserver.errors import RemoteError
from imserver.pb import im_pb2 as pb

#: How long Ctrl-D waits for the server to confirm pending sends.
DRAIN_TIMEOUT = 5.0
#: "(bob is typing...)" is shown when bob starts typing, and again only
#: after a stop, a message from bob, or this many seconds without a signal.
TYPING_INTERVAL = 4.0
#: Shown as the sender of a message the app backend sent (empty sender).
SYSTEM_SENDER = "(system)"
#: How roles are shown in the member list (members have no mark).
ROLE_MARKS = {pb.ROLE_OWNER: " (owner)", pb.ROLE_ADMIN: " (admin)"}


def clientMsgIdPrefix(deviceId):
    """
    The prefix of every C{client_msg_id} this command sends from
    C{deviceId}, so that a later run on the same device recognises its own
    earlier messages in the history.

    @rtype: L{str}
    """
    return "cli" + hashlib.sha256(deviceId.encode("utf-8")).hexdigest()[:8] + "-"


def printable(text):
    """
    Make received text safe for a terminal: control characters (escape
    sequences, carriage returns, ...) become U+FFFD, and continuation lines
    are indented.
    """
    chars = []
    for ch in text:
        if ch == "\n":
            chars.append("\n    ")
        elif ch != "\t" and unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            chars.append("\ufffd")
        else:
            chars.append(ch)
    return "".join(chars)


def bodyText(message):
    """
    @param message: a L{pb.Message} (or a L{pb.Notice}).
    @return: its body as text to print: UTF-8 text for C{text/*} (or no
        content type), else a note of its size and type.
    """
    contentType = message.content_type
    if contentType and not contentType.lower().startswith("text/"):
        return "[{} bytes of {}]".format(len(message.body), printable(contentType))
    return printable(message.body.decode("utf-8", "replace"))


class ChatSession:
    """
    One chat: lines from the terminal go to C{peer} (or to C{group}),
    messages and notices from the client are printed to C{out}.

    Outgoing entries (the user's own messages, which the server also stores
    in the user's inbox) are printed only when another device sent them;
    this process remembers the C{client_msg_id}s it sent so it does not print
    them a second time.

    The terminal input tells it when the user types (L{typing}) and
    empties a line without sending it (L{typingStopped}); it turns that into
    C{typing} signals to the peer or the group (L{TypingSignals}: a refresh
    every C{typingRefresh} seconds while typing goes on, a stop after
    C{typingIdle} seconds without a key).

    @ivar done: a L{Deferred} firing with the exit status once the session
        is over (0 after Ctrl-D with every send confirmed).
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        client,
        out,
        me,
        peer,
        where=None,
        localtime=time.localtime,
        drainTimeout=DRAIN_TIMEOUT,
        typingInterval=TYPING_INTERVAL,
        group=None,
        sendTyping=True,
        typingRefresh=TYPING_REFRESH,
        typingIdle=TYPING_IDLE,
        keepTrying=False,
        host=None,
        trusted=None,
    ):
        """
        @param reactor: an L{IReactorTime}.
        @param client: an L{imserver.client.IMClient} (or a fake of one);
            its C{onMessage} and C{onNotify} are set here.
        @param out: a text stream.
        @param me: this user's uid.
        @param peer: the uid to chat with, or L{None} with C{group}.
        @param group: the group to chat in, instead of C{peer}.
        @param where: C{"host:port"} for messages about connecting.
        @param localtime: turns Unix seconds into a C{struct_time}.
        @param sendTyping: whether to send typing signals.
        @param keepTrying: whether to keep trying when the server's
            certificate is refused (else the session ends, status 1).
        @param host: the host name the certificate must name, for messages.
        @param trusted: what is trusted, in words, for messages.
        """
        self.clock = reactor
        self.client = client
        self.out = out
        self.me = me
        self.peer = peer
        self.group = group
        self.where = where
        self.localtime = localtime
        self.drainTimeout = drainTimeout
        self.typingInterval = typingInterval
        self.sendTyping = sendTyping
        self.typingRefresh = typingRefresh
        self.typingIdle = typingIdle
        self.keepTrying = keepTrying
        self.host = host
        self.trusted = trusted
        self.done = Deferred()
        self._prefix = clientMsgIdPrefix(client.deviceId)
        self._sentIds = set()
        self._unanswered = 0
        self._inputEnded = False
        self._finished = False
        self._drainTimer = None
        # (uid, group id) -> when uid was last seen typing.
        self._typingSeenAt = {}
        # This user typing.
        self._typingSignals = TypingSignals(
            reactor, self._signalTyping, refresh=typingRefresh, idle=typingIdle
        )
        self._certificateHinted = False
        self._membersShown = False
        self._everConnected = False
        self._lastFailure = None
        client.onMessage = self.onMessage
        client.onNotify = self.onNotify

    def show(self, text):
        """
        Print one line.
        """
        self.out.write(text + "\n")
        self.out.flush()

    # -- life ---------------------------------------------------------------

    def start(self):
        """
        Start the client.

        @return: L{done}.
        """
        self.show(
            "chat {} as {}{} (Enter sends a line, Ctrl-D quits)".format(
                "in group " + self.group if self.group else "with " + self.peer,
                self.me,
                " via " + self.where if self.where else "",
            )
        )
        self.client.whenStopped().addCallback(self._stopped)
        self._awaitConnection()
        self.client.start()
        return self.done

    def _awaitConnection(self):
        self.client.whenConnected().addCallback(self._connected)

    def _connected(self, protocol):
        if self._finished:
            return
        self._lastFailure = None
        self.show(
            "{} as {} (session {})".format(
                "reconnected" if self._everConnected else "connected",
                self.me,
                protocol.session.session_id,
            )
        )
        self._everConnected = True
        protocol.whenClosed().addCallback(self._disconnected)
        if self.group and not self._membersShown:
            protocol.members(self.group).addCallbacks(self._showMembers, self._membersFailed)

    def _showMembers(self, members):
        if self._finished or self._membersShown:
            return
        self._membersShown = True
        self.show(
            "members of {}: {}".format(
                self.group,
                ", ".join(member.uid + ROLE_MARKS.get(member.role, "") for member in members),
            )
        )

    def _membersFailed(self, failure):
        # An answer is shown once; without one (the connection closed
        # first, or no answer in time), the next connection asks again.
        if self._finished or self._membersShown or not failure.check(RemoteError):
            return
        self._membersShown = True
        if failure.value.code == pb.NOT_MEMBER:
            self.show(
                "! you are not a member of group {} (or it does not exist):"
                " lines sent to it will be refused".format(self.group)
            )
        else:
            self.show(
                "! cannot list the members of {}: {}".format(self.group, describe(failure.value))
            )

    def _disconnected(self, reason):
        if self._finished or self.client.stopReason is not None:
            return
        self.show("disconnected ({}); reconnecting".format(describe(reason)))
        self._awaitConnection()

    def connectFailed(self, reason):
        """
        A connection attempt failed, or a connection closed before it was
        signed in; the client tries again by itself.  Each distinct reason
        is printed once until a connection succeeds.
        """
        if self._finished or self.client.stopReason is not None:
            return
        text = describe(reason).rstrip(".")
        problem = certificateProblem(reason)
        if problem is not None and not self.keepTrying:
            self.show(
                "! cannot connect{}: {}".format(" to " + self.where if self.where else "", text)
            )
            self.show(
                "! "
                + certificateHint(problem, self.host, self.trusted)
                + "; or --keep-trying to try again and again"
            )
            self._finish(1)
            return
        if text == self._lastFailure:
            return
        self._lastFailure = text
        self.show(
            "! cannot connect{}: {} (still trying)".format(
                " to " + self.where if self.where else "", text
            )
        )
        if problem is not None and not self._certificateHinted:
            self._certificateHinted = True
            self.show("! " + certificateHint(problem, self.host, self.trusted))

    def _stopped(self, reason):
        if self._finished:
            return
        if isinstance(reason, pb.Kicked):
            hint = ""
            if reason.reason == pb.REPLACED:
                hint = (
                    " (another session of {} signed in as device {!r};"
                    " give each one its own --device)".format(self.me, self.client.deviceId)
                )
            self.show("kicked: {}{}".format(describe(reason), hint))
        elif getattr(reason, "code", None) == pb.AUTH_FAILED:
            self.show(
                "kicked: the server refused the token for {} ({}); check"
                " --token, or --data-dir / --secret-file".format(self.me, describe(reason))
            )
        else:
            self.show("kicked: {}".format(describe(reason)))
        self._finish(1)

    def _finish(self, status):
        if self._finished:
            return
        self._typingSignals.stop()
        self._finished = True
        if self._drainTimer is not None:
            if self._drainTimer.active():
                self._drainTimer.cancel()
            self._drainTimer = None
        d = self.client.stop()
        d.addErrback(lambda f: self.log.failure("stopping the client failed", f))
        d.addCallback(lambda _: self.done.callback(status))

    # -- terminal input -----------------------------------------------------

    def lineReceived(self, line):
        """
        Send one line (L{bytes}, without its newline) to the peer or the
        group, unless it is blank.
        """
        if self._finished or self._inputEnded:
            return
        self._typingSignals.stop()
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            self.show("! not sent: the line is not valid UTF-8")
            return
        clientMsgId = self._prefix + uuid.uuid4().hex
        self._sentIds.add(clientMsgId)
        self._unanswered += 1
        d = self.client.send(
            self.peer or "", line, "text/plain", clientMsgId=clientMsgId, groupId=self.group or ""
        )
        d.addCallbacks(self._sent, self._sendFailed, errbackArgs=(clientMsgId, line))

    def _sent(self, response):
        self._answered()

    def _sendFailed(self, failure, clientMsgId, line):
        self._sentIds.discard(clientMsgId)
        text = line.decode("utf-8", "replace")
        if len(text) > 40:
            text = text[:39] + "\u2026"
        self.show("! send failed: {}: {}".format(describe(failure.value), printable(text)))
        self._answered()

    def _answered(self):
        self._unanswered -= 1
        if self._inputEnded and self._unanswered == 0:
            self._finish(0)

    def inputEnded(self):
        """
        The terminal input is closed (Ctrl-D): quit once every send is
        confirmed, or after C{drainTimeout} seconds (exit status 1, since
        some message may not have been sent).
        """
        if self._inputEnded or self._finished:
            return
        self._typingSignals.stop()
        self._inputEnded = True
        if self._unanswered == 0:
            self._finish(0)
            return
        self._drainTimer = self.clock.callLater(self.drainTimeout, self._drainTimedOut)

    def typing(self):
        """
        The user typed on a line not sent yet (that is not blank): tell the
        peer, unless it was told recently; stop after C{typingIdle} seconds
        without a call.
        """
        if not self.sendTyping or self._finished or self._inputEnded:
            return
        self._typingSignals.typing()

    def typingStopped(self):
        """
        The user emptied the line without sending it.
        """
        self._typingSignals.stop()

    def _signalTyping(self, active):
        return self.client.sendTyping(self.peer or "", active, groupId=self.group or "")

    def _drainTimedOut(self):
        self._drainTimer = None
        self.show(
            "! {} message(s) not confirmed by the server; they may not have been sent".format(
                self._unanswered
            )
        )
        self._finish(1)

    # -- from the server ----------------------------------------------------

    def onMessage(self, entry):
        """
        Print an inbox entry, unless it is the server's copy of a message
        this process sent.  A group message names its group; a message
        with no sender came from the app backend.

        @param entry: a L{pb.InboxEntry}.
        """
        message = entry.message
        if entry.outgoing:
            if message.client_msg_id in self._sentIds:
                self._sentIds.discard(message.client_msg_id)
                return
            who = "you"
            if not message.client_msg_id.startswith(self._prefix):
                who += " (other device)"
            if not message.group_id and message.recipient != self.peer:
                who += " to " + message.recipient
        else:
            who = message.sender or SYSTEM_SENDER
            self._typingSeenAt.pop((message.sender, message.group_id), None)
        if message.group_id:
            who += " in " + message.group_id
        self.show("[{}] {}: {}".format(self._time(message.created_ms), who, bodyText(message)))

    def onNotify(self, name, message):
        """
        Show a system notice; show the peer (or a member of the group)
        starting to type: once, and again only after a stop, a message from
        them, or C{typingInterval} seconds without a signal (the sender
        refreshes its signal more often while it types).
        """
        if name == "notice":
            self.show(
                "[{}] notice: {}".format(self._time(message.server_time_ms), bodyText(message))
            )
            return
        if name != "typing":
            return
        if self.group:
            if message.group_id != self.group or message.uid == self.me:
                return
        elif message.group_id or message.uid != self.peer:
            return
        key = (message.uid, message.group_id)
        if not message.active:
            self._typingSeenAt.pop(key, None)
            return
        now = self.clock.seconds()
        seenAt = self._typingSeenAt.get(key)
        self._typingSeenAt[key] = now
        if seenAt is not None and now - seenAt < self.typingInterval:
            return
        self.show("({} is typing...)".format(message.uid))

    def _time(self, ms):
        return time.strftime("%H:%M:%S", self.localtime(ms / 1000.0))
