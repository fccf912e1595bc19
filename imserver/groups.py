# -*- test-case-name: tests.test_groups -*-
"""
Group management rules, independent of sockets: the HTTP API manages groups
through L{Groups}, the gate lets members list them and leave.

A group has exactly one owner, set when it is created; it is never removed
and its role never changes (delete the group instead).  Everyone else is a
member or an admin.  The store enforces the maximum size atomically.
"""

import functools

from twisted.internet.defer import inlineCallbacks, maybeDeferred

from imserver.errors import BadRequest, NotMember
from imserver.identifiers import validateGroupId, validateLength, validateUid
from imserver.pb import im_pb2 as pb
from imserver.store import GroupNotFound

#: Longest group name, in UTF-8 bytes.
MAX_GROUP_NAME = 256

#: Roles that can be given with L{Groups.setMembers}.
ASSIGNABLE_ROLES = frozenset([pb.ROLE_MEMBER, pb.ROLE_ADMIN])


def _deferred(function):
    """
    Make C{function} return a failed L{Deferred} instead of raising.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return maybeDeferred(function, *args, **kwargs)

    return wrapper


class Groups:
    """
    Create, delete and change groups; list them.

    @ivar store: the L{imserver.interfaces.IGroupStore}.
    """

    def __init__(self, store, settings):
        self.store = store
        self.settings = settings

    @_deferred
    def create(self, groupId, name, owner, nowMs):
        """
        @return: a L{Deferred} firing with the new L{pb.Group}, or failing
            with L{BadRequest} or L{imserver.store.GroupExists}.
        """
        validateGroupId(groupId)
        validateUid(owner, "owner")
        validateLength("name", name, MAX_GROUP_NAME)
        return self.store.createGroup(groupId, name, owner, nowMs)

    @_deferred
    def delete(self, groupId):
        """
        @return: a L{Deferred} firing with L{True}, or failing with
            L{imserver.store.GroupNotFound}.
        """
        validateGroupId(groupId)
        return self.store.deleteGroup(groupId)

    @inlineCallbacks
    def setMembers(self, groupId, members, nowMs):
        """
        Add members or change their roles (member or admin), all or
        nothing.

        @param members: C{(uid, role)} pairs.
        @return: a L{Deferred} firing with the uids added, or failing with
            L{BadRequest}, L{imserver.store.GroupNotFound} or
            L{imserver.store.GroupFull}.
        """
        validateGroupId(groupId)
        members = list(members)
        if not members:
            raise BadRequest("no members given")
        for uid, role in members:
            validateUid(uid)
            if role not in ASSIGNABLE_ROLES:
                raise BadRequest("role must be member or admin")
        owner = yield self._owner(groupId)
        if owner in dict(members):
            raise BadRequest("the owner's role cannot change")
        added = yield self.store.setMembers(groupId, members, self.settings.max_group_size, nowMs)
        return added

    @inlineCallbacks
    def removeMembers(self, groupId, uids):
        """
        @return: a L{Deferred} firing with the uids that were removed, or
            failing with L{BadRequest} (the owner) or
            L{imserver.store.GroupNotFound}.
        """
        validateGroupId(groupId)
        uids = list(uids)
        owner = yield self._owner(groupId)
        if owner in uids:
            raise BadRequest("the owner cannot be removed; delete the group instead")
        removed = yield self.store.removeMembers(groupId, uids)
        return removed

    @inlineCallbacks
    def leave(self, groupId, uid):
        """
        C{uid} leaves C{groupId}.

        @return: a L{Deferred} firing with L{None}, or failing with
            L{NotMember} or L{BadRequest} (the owner cannot leave).
        """
        members = yield self.membersFor(groupId, uid)
        if any(m.uid == uid and m.role == pb.ROLE_OWNER for m in members):
            raise BadRequest("the owner cannot leave; delete the group instead")
        try:
            removed = yield self.store.removeMembers(groupId, [uid])
        except GroupNotFound:  # deleted meanwhile
            removed = []
        if not removed:
            raise NotMember("not a member of group {!r}".format(groupId))

    @inlineCallbacks
    def membersFor(self, groupId, uid):
        """
        The members of C{groupId}, for C{uid}, who must be one of them.

        @return: a L{Deferred} firing with the L{pb.Member}s, or failing with
            L{NotMember} (also when there is no such group).
        """
        validateGroupId(groupId)
        try:
            members = yield self.store.members(groupId)
        except GroupNotFound:
            members = []
        if not any(m.uid == uid for m in members):
            raise NotMember("not a member of group {!r}".format(groupId))
        return members

    @_deferred
    def members(self, groupId):
        """
        @return: a L{Deferred} firing with the L{pb.Member}s by uid, or
            failing with L{imserver.store.GroupNotFound}.
        """
        validateGroupId(groupId)
        return self.store.members(groupId)

    @_deferred
    def groupsOf(self, uid):
        """
        @return: a L{Deferred} firing with the L{pb.Group}s of C{uid}.
        """
        validateUid(uid)
        return self.store.groupsOf(uid)

    @_deferred
    def group(self, groupId):
        """
        @return: a L{Deferred} firing with the L{pb.Group} or L{None}.
        """
        validateGroupId(groupId)
        return self.store.group(groupId)

    @inlineCallbacks
    def _owner(self, groupId):
        members = yield self.store.members(groupId)
        return next((m.uid for m in members if m.role == pb.ROLE_OWNER), None)
