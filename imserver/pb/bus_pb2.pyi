from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Batch(_message.Message):
    __slots__ = ("source_gate", "items", "sent_ms")
    SOURCE_GATE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SENT_MS_FIELD_NUMBER: _ClassVar[int]
    source_gate: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    sent_ms: int
    def __init__(self, source_gate: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., sent_ms: _Optional[int] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("push", "kick", "typing", "notice", "broadcast")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    KICK_FIELD_NUMBER: _ClassVar[int]
    TYPING_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_FIELD_NUMBER: _ClassVar[int]
    push: Push
    kick: Kick
    typing: Typing
    notice: Notice
    broadcast: Broadcast
    def __init__(self, push: _Optional[_Union[Push, _Mapping]] = ..., kick: _Optional[_Union[Kick, _Mapping]] = ..., typing: _Optional[_Union[Typing, _Mapping]] = ..., notice: _Optional[_Union[Notice, _Mapping]] = ..., broadcast: _Optional[_Union[Broadcast, _Mapping]] = ...) -> None: ...

class Push(_message.Message):
    __slots__ = ("message", "targets")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    message: bytes
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    def __init__(self, message: _Optional[bytes] = ..., targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("uid", "seq", "outgoing")
    UID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OUTGOING_FIELD_NUMBER: _ClassVar[int]
    uid: str
    seq: int
    outgoing: bool
    def __init__(self, uid: _Optional[str] = ..., seq: _Optional[int] = ..., outgoing: _Optional[bool] = ...) -> None: ...

class Kick(_message.Message):
    __slots__ = ("uid", "device_id", "session_id", "generation", "reason", "message")
    UID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    uid: str
    device_id: str
    session_id: str
    generation: int
    reason: int
    message: str
    def __init__(self, uid: _Optional[str] = ..., device_id: _Optional[str] = ..., session_id: _Optional[str] = ..., generation: _Optional[int] = ..., reason: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Typing(_message.Message):
    __slots__ = ("to_uid", "from_uid", "active", "group_id")
    TO_UID_FIELD_NUMBER: _ClassVar[int]
    FROM_UID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    to_uid: str
    from_uid: str
    active: bool
    group_id: str
    def __init__(self, to_uid: _Optional[str] = ..., from_uid: _Optional[str] = ..., active: _Optional[bool] = ..., group_id: _Optional[str] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("session_id", "frame")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    frame: bytes
    def __init__(self, session_id: _Optional[str] = ..., frame: _Optional[bytes] = ...) -> None: ...

class Broadcast(_message.Message):
    __slots__ = ("frame",)
    FRAME_FIELD_NUMBER: _ClassVar[int]
    frame: bytes
    def __init__(self, frame: _Optional[bytes] = ...) -> None: ...
