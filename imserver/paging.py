# -*- test-case-name: tests.test_groups,tests.test_delivery -*-
"""
Paging of the gate's list responses (C{sync}, C{groups}, C{members}):
pure functions of the items and the gate's settings, used by
L{imserver.session.GateSession}.

A response holds whole items only, no more than fit one frame
(C{max_frame_length} less L{FRAME_OVERHEAD}) and at least one (every item
is capped well below the frame limit); a page of C{groups} or C{members}
holds at most C{sync_page_size} of them too.
"""

from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import Message

from imserver.pb import im_pb2 as pb
from imserver.settings import Settings

#: Bytes of a response frame besides its entries (envelope, head, slack).
FRAME_OVERHEAD = 256

_Item = TypeVar("_Item", bound=Message)


def fitFrame(items: Sequence[_Item], maxFrameLength: int) -> tuple[list[_Item], bool]:
    """
    The leading C{items} (protobuf messages) that fit one response frame of
    C{maxFrameLength} bytes: whole items only, at least one.

    @return: C{(kept, more)}: the items, and whether any were left out.
    """
    budget = maxFrameLength - FRAME_OVERHEAD
    kept: list[_Item] = []
    size = 0
    for item in items:
        size += item.ByteSize() + 6
        if kept and size > budget:
            return kept, True
        kept.append(item)
    return kept, False


def page(
    items: Sequence[_Item], key: str, after: str, limit: int, settings: Settings
) -> tuple[list[_Item], bool]:
    """
    One page of C{items} (sorted by C{key}) after C{after}: at most
    C{limit} items (C{sync_page_size} if C{limit} is 0 or larger) that fit
    one frame.

    @return: C{(page, more)}
    """
    pageSize = settings.sync_page_size
    limit = min(limit or pageSize, pageSize)
    items = [item for item in items if getattr(item, key) > after]
    kept, more = fitFrame(items[:limit], settings.max_frame_length)
    return kept, more or len(items) > limit


def groupsPage(
    groups: Sequence[pb.Group], request: pb.GroupsRequest, settings: Settings
) -> pb.GroupsResponse:
    """
    @return: the page of C{groups} that answers C{request}.
    """
    kept, more = page(groups, "group_id", request.after_group_id, request.limit, settings)
    return pb.GroupsResponse(groups=kept, more=more)


def membersPage(
    members: Sequence[pb.Member], request: pb.MembersRequest, settings: Settings
) -> pb.MembersResponse:
    """
    @return: the page of C{members} that answers C{request}.
    """
    kept, more = page(members, "uid", request.after_uid, request.limit, settings)
    return pb.MembersResponse(members=kept, more=more)
