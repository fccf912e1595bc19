"""
Message store implementations (L{imserver.interfaces.IMessageStore}).

C{memory}: tests and benchmarks.  C{sqlite}: the embedded default, durable.
C{redis}: cluster mode (C{--redis}), shared by every gate.
tests/test_store.py runs one suite against each.
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
