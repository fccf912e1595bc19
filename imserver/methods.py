"""
The methods and notifications of the wire protocol, declared once and shared
by the gate and the client.  docs/protocol.md describes each.
"""

from imserver.pb import im_pb2 as pb
from imserver.rpc import Method, Notification

#: Client -> server: the first request on every connection.
AUTH = Method("auth", pb.AuthRequest, pb.AuthResponse)

#: Either direction: heartbeat / round-trip check.
PING = Method("ping", pb.PingRequest, pb.PingResponse)

#: Server -> client: the session is being closed, with a reason.
KICKED = Notification("kicked", pb.Kicked)

#: Client -> server: store a message for a user.
SEND = Method("send", pb.SendRequest, pb.SendResponse)

#: Client -> server: read a page of the inbox.
SYNC = Method("sync", pb.SyncRequest, pb.SyncResponse)

#: Server -> client: an inbox entry (a message), in seq order.
MESSAGE = Notification("message", pb.InboxEntry)

#: Client -> server: cumulative acknowledgement of inbox entries.
ACK = Notification("ack", pb.Ack)

#: Both directions: transient typing signal, never stored.
TYPING = Notification("typing", pb.Typing)

#: Server -> client: a system notice (HTTP API broadcast), never stored.
NOTICE = Notification("notice", pb.Notice)

#: Client -> server: the groups the caller is a member of.
GROUPS = Method("groups", pb.GroupsRequest, pb.GroupsResponse)

#: Client -> server: the members of a group the caller is in.
MEMBERS = Method("members", pb.MembersRequest, pb.MembersResponse)

#: Client -> server: leave a group.
LEAVE = Method("leave", pb.LeaveRequest, pb.LeaveResponse)
