"""
Message store implementations (L{imserver.interfaces.IMessageStore}).

C{memory}: tests and benchmarks.  C{sqlite}: the embedded default, durable.
C{redis}: cluster mode (C{--redis}), shared by every gate.
tests/test_store.py runs one suite against each.

Each also keeps the webhook outbox (L{imserver.interfaces.IOutbox}), so
that an event is written in the transaction of the change it reports;
L{OutboxFullLog} and L{OUTBOX_LIMIT} are shared by the three.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Delivery:
    """
    The outcome of L{IMessageStore.deliver}.

    @ivar message: the stored L{imserver.pb.im_pb2.Message} (with its id and
        time), or for a duplicate the original as far as it is still kept.
    @ivar seqs: C{{uid: inbox seq}} for every recipient it was appended to;
        for a duplicate only the sender's.
    @ivar duplicate: L{True} if C{(sender, client_msg_id)} was seen within
        the dedup window and nothing new was stored.
    """

    message: object
    seqs: dict = field(default_factory=dict)
    duplicate: bool = False


class GroupExists(Exception):
    """
    A group with that id exists already.
    """


class GroupNotFound(Exception):
    """
    There is no group with that id.
    """


class GroupFull(Exception):
    """
    Adding the members would take the group beyond its maximum size.
    """


#: The system sender (HTTP API pushes): it has no inbox of its own.
SYSTEM = ""


def uniqueRecipients(sender, recipients):
    """
    The inboxes a message lands in, in order, each once: C{recipients}, then
    the sender's own (unless already there, or the sender is L{SYSTEM}).
    """
    seen = dict.fromkeys(recipients)
    if sender != SYSTEM:
        seen.setdefault(sender)
    return list(seen)


#: The most webhook outbox entries a store keeps until told otherwise
#: (L{imserver.interfaces.IOutbox.outboxLimit}).
OUTBOX_LIMIT = 1_000_000

#: Seconds between two log lines saying the outbox is full.
OUTBOX_FULL_LOG_INTERVAL = 10.0


class OutboxFullLog:
    """
    Says that a full outbox did not keep events: a warning at the first
    event not kept, then at most one per C{interval} seconds, each counting
    the events not kept since the one before.
    """

    def __init__(self, interval=OUTBOX_FULL_LOG_INTERVAL):
        self.interval = interval
        self._lastLogged = None
        self._unlogged = 0

    def dropped(self, log, count, total, limit, now):
        """
        C{count} more events were not kept (C{total} by this process).

        @param log: the store's L{twisted.logger.Logger}.
        @param limit: the outbox's limit.
        @param now: the time, in seconds (the store's clock).
        """
        self._unlogged += count
        if self._lastLogged is not None and now - self._lastLogged < self.interval:
            return
        self._lastLogged = now
        log.warn(
            "the webhook outbox is full ({limit} entries): {count} events not kept"
            " since the last report ({total} in all); what they report is stored",
            limit=limit,
            count=self._unlogged,
            total=total,
        )
        self._unlogged = 0
