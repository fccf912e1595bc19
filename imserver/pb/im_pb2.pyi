from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    REQUEST: _ClassVar[Kind]
    RESPONSE: _ClassVar[Kind]
    NOTIFY: _ClassVar[Kind]
    ERROR: _ClassVar[Kind]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    BAD_FRAME: _ClassVar[ErrorCode]
    FRAME_TOO_LARGE: _ClassVar[ErrorCode]
    EMPTY_FRAME: _ClassVar[ErrorCode]
    AUTH_TIMEOUT: _ClassVar[ErrorCode]
    IDLE_TIMEOUT: _ClassVar[ErrorCode]
    SERVER_SHUTDOWN: _ClassVar[ErrorCode]
    DUPLICATE_SEQ: _ClassVar[ErrorCode]
    BAD_ACK: _ClassVar[ErrorCode]
    SLOW_CONSUMER: _ClassVar[ErrorCode]
    UNKNOWN_METHOD: _ClassVar[ErrorCode]
    BAD_REQUEST: _ClassVar[ErrorCode]
    NOT_AUTHENTICATED: _ClassVar[ErrorCode]
    AUTH_FAILED: _ClassVar[ErrorCode]
    ALREADY_AUTHENTICATED: _ClassVar[ErrorCode]
    TOO_MANY_DEVICES: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
    TIMEOUT: _ClassVar[ErrorCode]
    MESSAGE_TOO_LARGE: _ClassVar[ErrorCode]
    UNAVAILABLE: _ClassVar[ErrorCode]
    NOT_MEMBER: _ClassVar[ErrorCode]
    RATE_LIMITED: _ClassVar[ErrorCode]
    REJECTED: _ClassVar[ErrorCode]

class Platform(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLATFORM_UNSPECIFIED: _ClassVar[Platform]
    IOS: _ClassVar[Platform]
    ANDROID: _ClassVar[Platform]
    WEB: _ClassVar[Platform]
    DESKTOP: _ClassVar[Platform]
    SERVER: _ClassVar[Platform]
    OTHER: _ClassVar[Platform]

class KickReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KICK_REASON_UNSPECIFIED: _ClassVar[KickReason]
    REPLACED: _ClassVar[KickReason]
    ADMIN: _ClassVar[KickReason]

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_MEMBER: _ClassVar[Role]
    ROLE_ADMIN: _ClassVar[Role]
    ROLE_OWNER: _ClassVar[Role]
KIND_UNSPECIFIED: Kind
REQUEST: Kind
RESPONSE: Kind
NOTIFY: Kind
ERROR: Kind
ERROR_CODE_UNSPECIFIED: ErrorCode
BAD_FRAME: ErrorCode
FRAME_TOO_LARGE: ErrorCode
EMPTY_FRAME: ErrorCode
AUTH_TIMEOUT: ErrorCode
IDLE_TIMEOUT: ErrorCode
SERVER_SHUTDOWN: ErrorCode
DUPLICATE_SEQ: ErrorCode
BAD_ACK: ErrorCode
SLOW_CONSUMER: ErrorCode
UNKNOWN_METHOD: ErrorCode
BAD_REQUEST: ErrorCode
NOT_AUTHENTICATED: ErrorCode
AUTH_FAILED: ErrorCode
ALREADY_AUTHENTICATED: ErrorCode
TOO_MANY_DEVICES: ErrorCode
INTERNAL: ErrorCode
TIMEOUT: ErrorCode
MESSAGE_TOO_LARGE: ErrorCode
UNAVAILABLE: ErrorCode
NOT_MEMBER: ErrorCode
RATE_LIMITED: ErrorCode
REJECTED: ErrorCode
PLATFORM_UNSPECIFIED: Platform
IOS: Platform
ANDROID: Platform
WEB: Platform
DESKTOP: Platform
SERVER: Platform
OTHER: Platform
KICK_REASON_UNSPECIFIED: KickReason
REPLACED: KickReason
ADMIN: KickReason
ROLE_UNSPECIFIED: Role
ROLE_MEMBER: Role
ROLE_ADMIN: Role
ROLE_OWNER: Role

class Frame(_message.Message):
    __slots__ = ("kind", "seq", "method", "body", "error")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    kind: Kind
    seq: int
    method: str
    body: bytes
    error: Error
    def __init__(self, kind: _Optional[_Union[Kind, str]] = ..., seq: _Optional[int] = ..., method: _Optional[str] = ..., body: _Optional[bytes] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class AuthRequest(_message.Message):
    __slots__ = ("uid", "token", "device_id", "platform", "last_seq", "client_version", "no_echo")
    UID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    NO_ECHO_FIELD_NUMBER: _ClassVar[int]
    uid: str
    token: str
    device_id: str
    platform: Platform
    last_seq: int
    client_version: str
    no_echo: bool
    def __init__(self, uid: _Optional[str] = ..., token: _Optional[str] = ..., device_id: _Optional[str] = ..., platform: _Optional[_Union[Platform, str]] = ..., last_seq: _Optional[int] = ..., client_version: _Optional[str] = ..., no_echo: _Optional[bool] = ...) -> None: ...

class AuthResponse(_message.Message):
    __slots__ = ("heartbeat_interval_ms", "idle_timeout_ms", "server_time_ms", "session_id", "max_frame_length", "head_seq", "max_message_body", "max_unacked", "no_echo")
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BODY_FIELD_NUMBER: _ClassVar[int]
    MAX_UNACKED_FIELD_NUMBER: _ClassVar[int]
    NO_ECHO_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_ms: int
    idle_timeout_ms: int
    server_time_ms: int
    session_id: str
    max_frame_length: int
    head_seq: int
    max_message_body: int
    max_unacked: int
    no_echo: bool
    def __init__(self, heartbeat_interval_ms: _Optional[int] = ..., idle_timeout_ms: _Optional[int] = ..., server_time_ms: _Optional[int] = ..., session_id: _Optional[str] = ..., max_frame_length: _Optional[int] = ..., head_seq: _Optional[int] = ..., max_message_body: _Optional[int] = ..., max_unacked: _Optional[int] = ..., no_echo: _Optional[bool] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("server_time_ms",)
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    server_time_ms: int
    def __init__(self, server_time_ms: _Optional[int] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("body", "content_type", "server_time_ms")
    BODY_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    content_type: str
    server_time_ms: int
    def __init__(self, body: _Optional[bytes] = ..., content_type: _Optional[str] = ..., server_time_ms: _Optional[int] = ...) -> None: ...

class Kicked(_message.Message):
    __slots__ = ("reason", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: KickReason
    message: str
    def __init__(self, reason: _Optional[_Union[KickReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("id", "sender", "recipient", "group_id", "client_msg_id", "body", "content_type", "created_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MSG_ID_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    id: int
    sender: str
    recipient: str
    group_id: str
    client_msg_id: str
    body: bytes
    content_type: str
    created_ms: int
    def __init__(self, id: _Optional[int] = ..., sender: _Optional[str] = ..., recipient: _Optional[str] = ..., group_id: _Optional[str] = ..., client_msg_id: _Optional[str] = ..., body: _Optional[bytes] = ..., content_type: _Optional[str] = ..., created_ms: _Optional[int] = ...) -> None: ...

class InboxEntry(_message.Message):
    __slots__ = ("seq", "outgoing", "message")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OUTGOING_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    outgoing: bool
    message: Message
    def __init__(self, seq: _Optional[int] = ..., outgoing: _Optional[bool] = ..., message: _Optional[_Union[Message, _Mapping]] = ...) -> None: ...

class SendRequest(_message.Message):
    __slots__ = ("to", "group_id", "client_msg_id", "body", "content_type")
    TO_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MSG_ID_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    to: str
    group_id: str
    client_msg_id: str
    body: bytes
    content_type: str
    def __init__(self, to: _Optional[str] = ..., group_id: _Optional[str] = ..., client_msg_id: _Optional[str] = ..., body: _Optional[bytes] = ..., content_type: _Optional[str] = ...) -> None: ...

class SendResponse(_message.Message):
    __slots__ = ("message_id", "server_time_ms", "seq", "duplicate", "echo_skipped")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ECHO_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    message_id: int
    server_time_ms: int
    seq: int
    duplicate: bool
    echo_skipped: bool
    def __init__(self, message_id: _Optional[int] = ..., server_time_ms: _Optional[int] = ..., seq: _Optional[int] = ..., duplicate: _Optional[bool] = ..., echo_skipped: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("after_seq", "limit")
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after_seq: int
    limit: int
    def __init__(self, after_seq: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class SyncResponse(_message.Message):
    __slots__ = ("entries", "head_seq")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[InboxEntry]
    head_seq: int
    def __init__(self, entries: _Optional[_Iterable[_Union[InboxEntry, _Mapping]]] = ..., head_seq: _Optional[int] = ...) -> None: ...

class Typing(_message.Message):
    __slots__ = ("uid", "active", "group_id")
    UID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    active: bool
    group_id: str
    def __init__(self, uid: _Optional[str] = ..., active: _Optional[bool] = ..., group_id: _Optional[str] = ...) -> None: ...

class Group(_message.Message):
    __slots__ = ("group_id", "name", "role", "member_count", "created_ms")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    name: str
    role: Role
    member_count: int
    created_ms: int
    def __init__(self, group_id: _Optional[str] = ..., name: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., member_count: _Optional[int] = ..., created_ms: _Optional[int] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("uid", "role", "joined_ms")
    UID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    JOINED_MS_FIELD_NUMBER: _ClassVar[int]
    uid: str
    role: Role
    joined_ms: int
    def __init__(self, uid: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., joined_ms: _Optional[int] = ...) -> None: ...

class GroupsRequest(_message.Message):
    __slots__ = ("after_group_id", "limit")
    AFTER_GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after_group_id: str
    limit: int
    def __init__(self, after_group_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class GroupsResponse(_message.Message):
    __slots__ = ("groups", "more")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[Group]
    more: bool
    def __init__(self, groups: _Optional[_Iterable[_Union[Group, _Mapping]]] = ..., more: _Optional[bool] = ...) -> None: ...

class MembersRequest(_message.Message):
    __slots__ = ("group_id", "after_uid", "limit")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_UID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    after_uid: str
    limit: int
    def __init__(self, group_id: _Optional[str] = ..., after_uid: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class MembersResponse(_message.Message):
    __slots__ = ("members", "more")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    more: bool
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., more: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("group_id",)
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    def __init__(self, group_id: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
