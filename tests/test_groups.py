# -*- test-case-name: tests.test_groups -*-
"""
Tests for groups through the gate (group send, fan-out, membership checks,
list / members / leave, group typing), the rules of L{imserver.groups}, the
serialize-once push encoding and broadcast notices.
"""

from twisted.trial.unittest import SynchronousTestCase

from imserver.errors import BadRequest, NotMember
from imserver.groups import Groups
from imserver.pb import im_pb2 as pb
from imserver.settings import Settings
from imserver.store import GroupFull, GroupNotFound
from imserver.store.memory import MemoryMessageStore

from tests.support.frames import written
from tests.support.gate import DeliveryHarness, pushes, responses

T0 = 1_700_000_000_000


class GroupsTests(SynchronousTestCase):
    """
    L{Groups}: the rules over the store.
    """

    def setUp(self):
        self.groups = Groups(MemoryMessageStore(), Settings(max_group_size=4))
        self.successResultOf(self.groups.create("g1", "Team", "alice", T0))

    def test_roleChangeInFullGroup(self):
        """
        Changing roles adds nobody, so it works even in a group at (or,
        after the limit was lowered, beyond) the maximum size.
        """
        self.successResultOf(
            self.groups.setMembers("g1", [(u, pb.ROLE_MEMBER) for u in ["b", "c", "d"]], T0)
        )
        self.groups.settings = Settings(max_group_size=2)
        self.successResultOf(self.groups.setMembers("g1", [("b", pb.ROLE_ADMIN)], T0))

    def test_badIds(self):
        """
        Group ids and uids follow the uid rules; names are bounded.
        """
        self.failureResultOf(self.groups.create("", "x", "alice", T0), BadRequest)
        self.failureResultOf(self.groups.create("g\n", "x", "alice", T0), BadRequest)
        self.failureResultOf(self.groups.create("g2", "x", "", T0), BadRequest)
        self.failureResultOf(self.groups.create("g2", "x" * 257, "alice", T0), BadRequest)
        self.failureResultOf(
            self.groups.setMembers("g1", [("b\x00", pb.ROLE_MEMBER)], T0), BadRequest
        )

    def test_roles(self):
        """
        Members can be made members or admins; the owner's role is fixed and
        nobody else can be made owner.
        """
        self.assertEqual(
            self.successResultOf(self.groups.setMembers("g1", [("bob", pb.ROLE_ADMIN)], T0)),
            ["bob"],
        )
        self.failureResultOf(
            self.groups.setMembers("g1", [("carol", pb.ROLE_OWNER)], T0), BadRequest
        )
        self.failureResultOf(
            self.groups.setMembers("g1", [("alice", pb.ROLE_MEMBER)], T0), BadRequest
        )
        self.failureResultOf(self.groups.setMembers("g1", [("carol", 99)], T0), BadRequest)
        self.failureResultOf(self.groups.setMembers("g1", [], T0), BadRequest)

    def test_maxGroupSize(self):
        """
        The store refuses members beyond the C{max_group_size} setting.
        """
        self.failureResultOf(
            self.groups.setMembers("g1", [(u, pb.ROLE_MEMBER) for u in ["b", "c", "d", "e"]], T0),
            GroupFull,
        )
        self.successResultOf(
            self.groups.setMembers("g1", [(u, pb.ROLE_MEMBER) for u in ["b", "c", "d"]], T0)
        )

    def test_ownerStays(self):
        """
        The owner can neither be removed nor leave.
        """
        self.failureResultOf(self.groups.removeMembers("g1", ["alice"]), BadRequest)
        self.failureResultOf(self.groups.leave("g1", "alice"), BadRequest)

    def test_leave(self):
        """
        A member leaves; leaving again, or a group that does not exist,
        gives L{NotMember}.
        """
        self.successResultOf(self.groups.setMembers("g1", [("bob", pb.ROLE_MEMBER)], T0))
        self.successResultOf(self.groups.leave("g1", "bob"))
        self.failureResultOf(self.groups.leave("g1", "bob"), NotMember)
        self.failureResultOf(self.groups.leave("nope", "bob"), NotMember)

    def test_membersFor(self):
        """
        Only members may list the members; a missing group looks the same
        as one the caller is not in.
        """
        members = self.successResultOf(self.groups.membersFor("g1", "alice"))
        self.assertEqual([m.uid for m in members], ["alice"])
        self.failureResultOf(self.groups.membersFor("g1", "mallory"), NotMember)
        self.failureResultOf(self.groups.membersFor("nope", "mallory"), NotMember)
        self.failureResultOf(self.groups.members("nope"), GroupNotFound)


class GateGroupTests(SynchronousTestCase):
    """
    Groups over the client protocol.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self)
        store = self.gate.factory.store
        self.successResultOf(store.createGroup("g1", "Team", "alice", T0))
        self.successResultOf(
            store.setMembers(
                "g1",
                [("bob", pb.ROLE_MEMBER), ("carol", pb.ROLE_ADMIN), ("dave", pb.ROLE_MEMBER)],
                100,
                T0,
            )
        )
        self.sessions = {}
        for uid in ["alice", "bob", "carol", "mallory"]:
            protocol, transport, _, _ = self.gate.login(uid)
            self.sessions[uid] = (protocol, transport)

    def call(self, uid, method, request):
        protocol, transport = self.sessions[uid]
        self.gate.seq += 1
        self.gate.request(protocol, method, request, seq=self.gate.seq)
        return responses(written(transport))[-1]

    def groupSend(self, uid, clientMsgId, body=b"hi", groupId="g1"):
        return self.call(
            uid, "send", pb.SendRequest(group_id=groupId, client_msg_id=clientMsgId, body=body)
        )

    def test_fanOut(self):
        """
        A member's group message is pushed once to every online member, with
        each member's own inbox seq; offline members find it in their inbox.
        """
        self.call("bob", "send", pb.SendRequest(to="carol", client_msg_id="x"))
        for uid in self.sessions:
            written(self.sessions[uid][1])
        response = self.groupSend("alice", "m1", b"hello team")
        self.assertFalse(response.HasField("error"), response.error)
        result = pb.SendResponse.FromString(response.body)
        for uid, seq in [("bob", 2), ("carol", 2)]:
            [entry] = pushes(written(self.sessions[uid][1]))
            self.assertEqual((entry.seq, entry.outgoing), (seq, False))
            self.assertEqual(
                (
                    entry.message.group_id,
                    entry.message.sender,
                    entry.message.body,
                    entry.message.id,
                ),
                ("g1", "alice", b"hello team", result.message_id),
            )
        self.assertEqual(pushes(written(self.sessions["mallory"][1])), [])
        [dave] = self.successResultOf(self.gate.factory.store.fetch("dave", 0, 10))
        self.assertEqual(dave.message.id, result.message_id)

    def test_senderOwnCopy(self):
        """
        The sender's own copy is outgoing, at the seq the response names.
        """
        protocol, transport = self.sessions["alice"]
        written(transport)
        self.gate.request(protocol, "send", pb.SendRequest(group_id="g1", client_msg_id="m1"))
        frames = written(transport)
        result = pb.SendResponse.FromString(responses(frames)[0].body)
        [own] = pushes(frames)
        self.assertEqual((own.seq, own.outgoing), (result.seq, True))

    def test_notMember(self):
        """
        A non-member's group send is refused with C{NOT_MEMBER} and stores
        nothing; so is a send to a group that does not exist.
        """
        for groupId in ["g1", "nope"]:
            response = self.groupSend("mallory", "m-" + groupId, groupId=groupId)
            self.assertEqual(response.error.code, pb.NOT_MEMBER)
        store = self.gate.factory.store
        for uid in ["alice", "bob", "mallory"]:
            self.assertEqual(self.successResultOf(store.head(uid)), 0)

    def test_toAndGroup(self):
        """
        A send naming both a recipient and a group is a C{BAD_REQUEST}.
        """
        response = self.call(
            "alice", "send", pb.SendRequest(to="bob", group_id="g1", client_msg_id="m1")
        )
        self.assertEqual(response.error.code, pb.BAD_REQUEST)

    def test_removedMemberStops(self):
        """
        A removed member gets no more group messages and cannot send.
        """
        self.successResultOf(self.gate.factory.groups.removeMembers("g1", ["bob"]))
        written(self.sessions["bob"][1])
        self.groupSend("alice", "m1")
        self.assertEqual(pushes(written(self.sessions["bob"][1])), [])
        self.assertEqual(self.groupSend("bob", "m2").error.code, pb.NOT_MEMBER)

    def test_listGroups(self):
        """
        C{groups} lists the caller's groups with its role.
        """
        response = self.call("carol", "groups", pb.GroupsRequest())
        [group] = pb.GroupsResponse.FromString(response.body).groups
        self.assertEqual(
            (group.group_id, group.name, group.role, group.member_count),
            ("g1", "Team", pb.ROLE_ADMIN, 4),
        )
        response = self.call("mallory", "groups", pb.GroupsRequest())
        self.assertEqual(list(pb.GroupsResponse.FromString(response.body).groups), [])

    def test_listMembers(self):
        """
        C{members} lists a group's members for a member only.
        """
        response = self.call("bob", "members", pb.MembersRequest(group_id="g1"))
        members = pb.MembersResponse.FromString(response.body).members
        self.assertEqual(
            [(m.uid, m.role) for m in members],
            [
                ("alice", pb.ROLE_OWNER),
                ("bob", pb.ROLE_MEMBER),
                ("carol", pb.ROLE_ADMIN),
                ("dave", pb.ROLE_MEMBER),
            ],
        )
        response = self.call("mallory", "members", pb.MembersRequest(group_id="g1"))
        self.assertEqual(response.error.code, pb.NOT_MEMBER)
        response = self.call("bob", "members", pb.MembersRequest(group_id=""))
        self.assertEqual(response.error.code, pb.BAD_REQUEST)

    def test_membersPaged(self):
        """
        C{members} pages by uid: C{limit} entries, C{more} while others
        follow, C{after_uid} for the next page.
        """
        response = self.call("bob", "members", pb.MembersRequest(group_id="g1", limit=3))
        page = pb.MembersResponse.FromString(response.body)
        self.assertEqual(
            ([m.uid for m in page.members], page.more), (["alice", "bob", "carol"], True)
        )
        response = self.call(
            "bob", "members", pb.MembersRequest(group_id="g1", after_uid="carol", limit=3)
        )
        page = pb.MembersResponse.FromString(response.body)
        self.assertEqual(([m.uid for m in page.members], page.more), (["dave"], False))

    def test_pagesFitOneFrame(self):
        """
        A page never exceeds the frame limit, whatever the page size: it is
        cut short and says there is more.
        """
        gate = DeliveryHarness(
            self,
            max_frame_length=2048,
            max_message_body=1024,
            preauth_max_frame_length=1024,
            sync_page_size=1000,
        )
        store = gate.factory.store
        self.successResultOf(store.createGroup("g", "G", "a" * 100, T0))
        self.successResultOf(
            store.setMembers(
                "g", [("m{:03d}".format(i) + "x" * 100, pb.ROLE_MEMBER) for i in range(50)], 100, T0
            )
        )
        protocol, transport, _, _ = gate.login("a" * 100)
        gate.request(protocol, "members", pb.MembersRequest(group_id="g"), seq=9)
        [response] = responses(written(transport))
        page = pb.MembersResponse.FromString(response.body)
        self.assertTrue(page.more)
        self.assertLess(len(response.SerializeToString()), 2048)
        self.assertGreater(len(page.members), 1)

    def test_groupsPaged(self):
        """
        C{groups} pages by group id.
        """
        store = self.gate.factory.store
        for groupId in ["g0", "g2", "g3"]:
            self.successResultOf(store.createGroup(groupId, groupId, "carol", T0))
        response = self.call("carol", "groups", pb.GroupsRequest(limit=2))
        page = pb.GroupsResponse.FromString(response.body)
        self.assertEqual(([g.group_id for g in page.groups], page.more), (["g0", "g1"], True))
        response = self.call("carol", "groups", pb.GroupsRequest(after_group_id="g1"))
        page = pb.GroupsResponse.FromString(response.body)
        self.assertEqual(([g.group_id for g in page.groups], page.more), (["g2", "g3"], False))

    def test_leave(self):
        """
        C{leave} removes the caller; the owner cannot leave.
        """
        response = self.call("bob", "leave", pb.LeaveRequest(group_id="g1"))
        self.assertFalse(response.HasField("error"), response.error)
        self.assertEqual(self.groupSend("bob", "m1").error.code, pb.NOT_MEMBER)
        response = self.call("bob", "leave", pb.LeaveRequest(group_id="g1"))
        self.assertEqual(response.error.code, pb.NOT_MEMBER)
        response = self.call("alice", "leave", pb.LeaveRequest(group_id="g1"))
        self.assertEqual(response.error.code, pb.BAD_REQUEST)

    def test_groupTyping(self):
        """
        A member's typing in a group reaches the other online members with
        the group id; a non-member's goes nowhere.
        """
        for uid in self.sessions:
            written(self.sessions[uid][1])
        protocol = self.sessions["bob"][0]
        self.gate.notify(protocol, "typing", pb.Typing(group_id="g1", active=True))
        for uid in ["alice", "carol"]:
            [frame] = written(self.sessions[uid][1])
            typing = pb.Typing.FromString(frame.body)
            self.assertEqual(
                (frame.method, typing.uid, typing.group_id, typing.active),
                ("typing", "bob", "g1", True),
            )
        self.assertEqual(written(self.sessions["bob"][1]), [])
        self.gate.notify(
            self.sessions["mallory"][0], "typing", pb.Typing(group_id="g1", active=True)
        )
        for uid in self.sessions:
            self.assertEqual(written(self.sessions[uid][1]), [])


class LargeGroupTests(SynchronousTestCase):
    """
    Fan-out to a 500-member group.
    """

    def test_exactlyOnce(self):
        """
        Messages to a 500-member group reach each of the 300 online members
        exactly once, in order, and each of the 200 offline members when it
        connects; every member's inbox holds each message once.
        """
        gate = DeliveryHarness(self, max_unacked=1000)
        store = gate.factory.store
        uids = ["m{:03d}".format(i) for i in range(500)]
        self.successResultOf(store.createGroup("big", "Big", uids[0], T0))
        self.successResultOf(
            gate.factory.groups.setMembers("big", [(uid, pb.ROLE_MEMBER) for uid in uids[1:]], T0)
        )
        online = {uid: gate.login(uid)[:2] for uid in uids[:300]}
        for _, transport in online.values():
            written(transport)
        sender = online[uids[1]][0]
        for n in range(3):
            gate.seq += 1
            gate.request(
                sender,
                "send",
                pb.SendRequest(group_id="big", client_msg_id="m{}".format(n), body=b"%d" % n),
                seq=gate.seq,
            )
        for uid, (_, transport) in online.items():
            entries = pushes(written(transport))
            self.assertEqual([e.message.body for e in entries], [b"0", b"1", b"2"], uid)
            self.assertEqual([e.seq for e in entries], [1, 2, 3], uid)
        for uid in uids[300:]:
            _, transport, auth, frames = gate.login(uid)
            self.assertEqual(auth.head_seq, 3)
            self.assertEqual(
                [e.message.body for e in pushes(frames + written(transport))],
                [b"0", b"1", b"2"],
                uid,
            )


class BroadcastTests(SynchronousTestCase):
    """
    L{GateFactory.broadcast}: a notice to every authenticated session.
    """

    def test_broadcast(self):
        """
        Every authenticated session gets the same C{notice} frame; a
        connection that has not authenticated gets nothing.
        """
        gate = DeliveryHarness(self)
        sessions = [gate.login(uid)[:2] for uid in ["alice", "bob"]]
        anonymous, anonymousT = gate.connect()
        for _, transport in sessions:
            written(transport)
        self.assertEqual(gate.factory.broadcast(b"maintenance at 5", "text/plain"), 2)
        for _, transport in sessions:
            [frame] = written(transport)
            notice = pb.Notice.FromString(frame.body)
            self.assertEqual(
                (frame.kind, frame.method, notice.body, notice.content_type),
                (pb.NOTIFY, "notice", b"maintenance at 5", "text/plain"),
            )
            self.assertEqual(notice.server_time_ms, T0)
        self.assertEqual(written(anonymousT), [])
