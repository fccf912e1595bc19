# -*- test-case-name: tests.test_browser -*-
"""
The chat page and the JavaScript client (C{imserver/web/static}) in a real
browser: Chromium driven by Playwright's sync API, against a real C{twistd
im} gate with a C{--web} listener (L{tests.support.twistd.Gate}), on
loopback, each page opened with the address C{python -m imserver web-url}
prints.

Needs the C{playwright} Python package (C{pip install playwright}; it
downloads no browser here) and the program C{chromium} (Debian package
C{chromium}, found as L{tests.support.requireExecutable} finds programs):
skipped without them, failed instead when C{$CI_REQUIRE_ALL} is C{1}.

How the tests wait: Playwright's own waits (for selectors and conditions,
each bounded by L{WAIT}) while a page works, and Deferreds on the reactor
(the gate starting or ending, a TCP client receiving) otherwise; never a
sleep.  A Playwright call blocks the reactor, which is harmless here: the
gate is another process, and the TCP client of L{ChatTests.test_tcpClient}
is only driven from the reactor while no Playwright call runs.
"""

import collections
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from imserver.auth import mintToken
from imserver.client import IMClient

from tests.support import freePort, requireDependency, requireExecutable
from tests.support.live import Changes, withDeadline
from tests.support.twistd import Gate

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = expect = None

#: The browser: Debian's Chromium (Playwright is told to use it, so it
#: never downloads one of its own).
#: Seconds any one wait for the page may take.
WAIT = 20.0
#: Seconds a page may take to reconnect after the gate is back: its
#: backoff grew while the gate was down (full jitter, doubling from 0.5 s).
RECONNECT_WAIT = 60.0
#: Seconds a TCP client may take to connect or to receive.
TCP_WAIT = 20.0
#: Where a screenshot is copied when trial runs in its usual directory.
SCREENSHOT_NAME = "browser-screenshot.png"


def requireBrowser():
    """
    Skip the calling test without Playwright or Chromium (fail it under
    C{$CI_REQUIRE_ALL}).

    @return: the path of Chromium.
    """
    requireDependency(
        sync_playwright is not None, "the playwright Python package (pip install playwright)"
    )
    return requireExecutable("chromium", "chromium (Debian package chromium)")


class Browser:
    """
    One Chromium for a test, and its pages: each page in a context of its
    own (its own C{sessionStorage}, so its own device), with the uncaught
    JavaScript errors of every page collected in L{errors}.
    """

    def __init__(self, testCase, executable):
        self.playwright = sync_playwright().start()
        testCase.addCleanup(self.playwright.stop)
        self.browser = self.playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox"], timeout=WAIT * 1000
        )
        testCase.addCleanup(self.browser.close)
        # The expect() assertions have their own timeout (5 s by default).
        expect.set_options(timeout=WAIT * 1000)
        self.errors = []

    def page(self):
        """
        A new page in a new browser context.
        """
        context = self.browser.new_context()
        context.set_default_timeout(WAIT * 1000)
        page = context.new_page()
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        return page


class ChatTests(TestCase):
    """
    Users chat through the page, across reloads and a gate restart, with
    each other and with a TCP client.
    """

    timeout = 240

    @inlineCallbacks
    def setUp(self):
        """
        A gate on SQLite with its client listener and its web listener on
        free loopback ports (the same ones across restarts), and a browser.
        """
        chromium = requireBrowser()
        self.checks = 0
        self.webPort = freePort()
        dataDir = FilePath(self.mktemp())
        dataDir.makedirs()
        self.gate = Gate(
            dataDir,
            ["--store", "sqlite", "--web", "tcp:{}:interface=127.0.0.1".format(self.webPort)],
            api=True,
        )
        self.addCleanup(self.gate.stop)
        yield self.gate.start()
        self.browser = Browser(self, chromium)
        self.addCleanup(self.assertNoPageErrors)

    def assertNoPageErrors(self):
        """
        No page threw an uncaught JavaScript error.
        """
        self.assertEqual(self.browser.errors, [])

    # -- helpers ---------------------------------------------------------------

    def webURL(self, uid):
        """
        The address of the signed-in page for C{uid}, as C{python -m
        imserver web-url} prints it.
        """
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "imserver",
                "web-url",
                "--uid",
                uid,
                "--data-dir",
                self.gate.dataDir.path,
                "--url",
                "http://127.0.0.1:{}/".format(self.webPort),
            ],
            env=self.gate.env,
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=True,
        )
        url = result.stdout.strip()
        self.assertTrue(url.startswith("http://127.0.0.1:{}/#uid=".format(self.webPort)), url)
        return url

    def signIn(self, uid):
        """
        Open the page of C{uid} and wait until it is connected.
        """
        page = self.browser.page()
        page.goto(self.webURL(uid))
        expect(page.locator("#status")).to_have_text("connected as " + uid)
        expect(page.locator("#banner")).to_be_hidden()
        # The token left the address bar (and the history).
        self.assertNotIn("#", page.url)
        self.assertNotIn("token", page.url)
        return page

    def openPeer(self, page, peer):
        """
        Start (or open) the conversation with C{peer} by its uid.
        """
        page.fill("#new-peer", peer)
        page.click("#open-peer")
        expect(page.locator('#conversations [data-peer="{}"]'.format(peer))).to_have_count(1)
        expect(page.locator("#conversation-title")).to_contain_text(peer)

    def select(self, page, peer):
        """
        Select the conversation with C{peer} in the list.
        """
        page.click('#conversations [data-peer="{}"]'.format(peer))
        expect(page.locator("#conversation-title")).to_contain_text(peer)

    def type(self, page, text):
        """
        Send C{text} from the composer.
        """
        page.fill("#text", text)
        page.click("#send-button")
        expect(page.locator("#text")).to_have_value("")

    def shown(self, page, texts, timeout=WAIT):
        """
        Wait until the open conversation shows exactly C{texts}, in order.
        """
        expect(page.locator("#messages li.message .text")).to_have_text(
            texts, timeout=timeout * 1000
        )

    def assertShownOnce(self, page):
        """
        Every message of the open conversation is shown once: one item per
        clientMsgId and per seq, each with its seq known.

        @return: the items' C{(seq, clientMsgId, state, text)}, in order.
        """
        items = page.eval_on_selector_all(
            "#messages li.message",
            "items => items.map(li => [li.dataset.seq, li.dataset.clientMsgId,"
            " li.dataset.state, li.querySelector('.text').textContent])",
        )
        ids = collections.Counter(item[1] for item in items)
        seqs = collections.Counter(item[0] for item in items)
        self.assertEqual([i for i, n in ids.items() if n > 1], [], items)
        self.assertEqual([s for s, n in seqs.items() if n > 1], [], items)
        self.assertNotIn("", seqs, items)
        return items

    def screenshot(self, page):
        """
        Keep a screenshot of C{page} under the test's temporary directory,
        and copy it to L{SCREENSHOT_NAME} in trial's directory when that is
        where the tests run.
        """
        path = FilePath(self.mktemp() + "-" + SCREENSHOT_NAME)
        page.screenshot(path=path.path, full_page=True)
        self.assertTrue(path.exists())
        if os.path.basename(os.getcwd()).startswith("_trial_temp"):
            shutil.copyfile(path.path, SCREENSHOT_NAME)
        return path

    def api(self, path, body):
        """
        Call the gate's HTTP API (blocking: the gate is another process).

        @return: the decoded JSON answer.
        """
        token = self.gate.dataDir.child("admin-token").getContent().decode("ascii").strip()
        request = urllib.request.Request(
            "http://127.0.0.1:{}{}".format(self.gate.apiPort, path),
            data=json.dumps(body).encode("utf-8"),
            headers={"Authorization": "Bearer " + token},
        )
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            return json.load(answer)

    def metric(self, name):
        """
        The value of the gate's Prometheus sample C{name} (blocking).
        """
        url = "http://127.0.0.1:{}/metrics".format(self.gate.apiPort)
        with urllib.request.urlopen(url, timeout=WAIT) as answer:
            for line in answer.read().decode("utf-8").splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise AssertionError("no metric {}".format(name))

    def tcpClient(self, uid, deviceId, onMessage, lastSeq=0):
        """
        A started L{IMClient} over TCP (the gate's plain C{tcp:} listener);
        stopped at cleanup.
        """
        secret = self.gate.secret()
        client = IMClient(
            reactor,
            "127.0.0.1",
            self.gate.port,
            uid,
            lambda: mintToken(secret, uid, 600, time.time()),
            deviceId,
            onMessage=onMessage,
            lastSeq=lastSeq,
            tls=False,
        )
        client.start()
        self.addCleanup(client.stop)
        return client

    @inlineCallbacks
    def inbox(self, uid):
        """
        Read the whole inbox of C{uid}, as a new device is pushed it from
        seq 0 (the client is stopped at cleanup).

        @return: a L{Deferred} firing with the L{pb.InboxEntry}s in order.
        """
        entries = []
        changes = Changes()

        def received(entry):
            entries.append(entry)
            changes.changed()

        self.checks += 1
        client = self.tcpClient(uid, "check-{}".format(self.checks), received)
        protocol = yield withDeadline(client.whenConnected(), TCP_WAIT, "connecting over TCP")
        head = protocol.session.head_seq
        yield changes.until(lambda: client.lastSeq >= head, TCP_WAIT, "the whole inbox")
        return entries

    # -- tests ----------------------------------------------------------------

    def test_twoPages(self):
        """
        Two users chat through their pages, both ways: a message shows at
        once as pending or confirmed on the sender's side, then confirmed
        (once: the page asks for C{noEcho}, so the gate does not push it
        back), and as received on the other side; typing shows on the other
        side; after a reload the page shows the history once, in order (its
        own messages included, pushed to the new connection).
        """
        alice = self.signIn("alice")
        bob = self.signIn("bob")
        self.openPeer(alice, "bob")
        self.type(alice, "hello bob")
        mine = alice.locator("#messages li.message")
        expect(mine).to_have_count(1)
        expect(mine).to_have_attribute("data-state", "confirmed")
        expect(mine).not_to_have_attribute("data-seq", "")

        # bob's list gains alice with the message.
        self.select(bob, "alice")
        self.shown(bob, ["hello bob"])
        expect(bob.locator("#messages li.message")).to_have_attribute("data-state", "received")

        bob.fill("#text", "hi alice")
        bob.press("#text", "Enter")
        self.shown(alice, ["hello bob", "hi alice"])
        self.shown(bob, ["hello bob", "hi alice"])
        expect(bob.locator("#messages li.message").last).to_have_attribute(
            "data-state", "confirmed"
        )
        self.assertEqual(self.metric("imserver_echoes_skipped_total"), 2)

        # Typing: shown while bob types, gone when he clears the field.
        bob.locator("#text").press_sequentially("are you")
        expect(alice.locator("#typing")).to_have_text("bob is typing…")
        bob.fill("#text", "")
        expect(alice.locator("#typing")).to_have_text("")

        bob.reload()
        expect(bob.locator("#status")).to_have_text("connected as bob")
        self.select(bob, "alice")
        self.shown(bob, ["hello bob", "hi alice"])
        states = [state for _, _, state, _ in self.assertShownOnce(bob)]
        self.assertEqual(states, ["received", "confirmed"])
        self.assertShownOnce(alice)
        self.screenshot(alice)

    def test_signInForm(self):
        """
        Without a signed-in address the page asks for uid and token; a
        refused token brings the form back with a message, a good one
        connects.
        """
        page = self.browser.page()
        page.goto("http://127.0.0.1:{}/".format(self.webPort))
        expect(page.locator("#signin")).to_be_visible()
        page.fill("#uid", "carol")
        page.fill("#token", "v1.1.not-a-token")
        page.click("#signin-button")
        expect(page.locator("#signin-error")).to_contain_text("refused")
        expect(page.locator("#signin")).to_be_visible()

        page.fill("#uid", "carol")
        page.fill("#token", mintToken(self.gate.secret(), "carol", 600, time.time()))
        page.click("#signin-button")
        expect(page.locator("#status")).to_have_text("connected as carol")
        expect(page.locator("#signin")).to_be_hidden()

    @inlineCallbacks
    def test_tcpClient(self):
        """
        A page and a TCP client of the Python library talk both ways.
        """
        received = []
        changes = Changes()

        def onMessage(entry):
            received.append(entry)
            changes.changed()

        client = self.tcpClient("dave", "phone", onMessage)
        yield withDeadline(client.whenConnected(), TCP_WAIT, "dave connecting over TCP")

        erin = self.signIn("erin")
        self.openPeer(erin, "dave")
        self.type(erin, "from the page ✓")
        expect(erin.locator("#messages li.message")).to_have_attribute("data-state", "confirmed")

        yield changes.until(lambda: len(received) == 1, TCP_WAIT, "dave receiving")
        [entry] = received
        self.assertEqual(entry.message.sender, "erin")
        self.assertEqual(entry.message.body.decode("utf-8"), "from the page ✓")
        self.assertEqual(entry.message.content_type, "text/plain")

        yield withDeadline(
            client.send("erin", b"from TCP", "text/plain", clientMsgId="dave-1"),
            TCP_WAIT,
            "dave's send answered",
        )
        self.shown(erin, ["from the page ✓", "from TCP"])
        items = self.assertShownOnce(erin)
        self.assertEqual(items[1][1:3], ["dave-1", "received"])

    def test_group(self):
        """
        A group made by the app backend shows in its members' lists with
        its name; its members write to it and see each other typing in it.
        """
        self.api("/v1/groups", {"group_id": "team", "name": "The team", "owner": "alice"})
        self.api("/v1/groups/team/members", {"members": [{"uid": "bob"}]})
        alice = self.signIn("alice")
        bob = self.signIn("bob")
        for page in (alice, bob):
            group = page.locator('#conversations [data-group="team"]')
            expect(group).to_contain_text("The team")
            group.click()
            expect(page.locator("#conversation-title")).to_contain_text("The team")

        self.type(alice, "hello team")
        self.shown(bob, ["hello team"])
        bob.locator("#text").press_sequentially("hi")
        expect(alice.locator("#typing")).to_have_text("bob is typing…")
        bob.press("#text", "Enter")
        expect(alice.locator("#typing")).to_have_text("")
        self.shown(alice, ["hello team", "hi"])
        self.assertShownOnce(alice)
        self.assertShownOnce(bob)

    @inlineCallbacks
    def test_gateRestart(self):
        """
        The gate is killed (SIGKILL) while a page has messages typed during
        the outage and restarted on the same ports and data: the page says
        it is disconnected, keeps the messages pending, reconnects by
        itself, and every message typed is delivered exactly once (in the
        recipient's inbox and on his page) and shown once on both pages.
        """
        alice = self.signIn("alice")
        bob = self.signIn("bob")
        self.openPeer(alice, "bob")
        self.type(alice, "before")
        self.select(bob, "alice")
        self.shown(bob, ["before"])

        yield self.gate.kill()
        banner = alice.locator("#banner")
        expect(banner).to_be_visible()
        expect(banner).to_have_attribute("role", "status")
        expect(banner).to_contain_text("Reconnecting")
        during = ["during {}".format(i) for i in range(3)]
        for text in during:
            self.type(alice, text)
        expect(alice.locator('#messages li.message[data-state="pending"]')).to_have_count(3)
        expect(banner).to_contain_text("waiting to be sent")

        yield self.gate.start()
        expect(alice.locator("#status")).to_have_text(
            "connected as alice", timeout=RECONNECT_WAIT * 1000
        )
        expect(banner).to_be_hidden()
        everything = ["before"] + during
        self.shown(bob, everything, timeout=RECONNECT_WAIT)
        self.shown(alice, everything)
        expect(alice.locator('#messages li.message[data-state="confirmed"]')).to_have_count(4)
        sent = self.assertShownOnce(alice)
        self.assertShownOnce(bob)
        self.screenshot(alice)

        # Exactly once in bob's inbox, with the page's clientMsgIds.
        entries = yield self.inbox("bob")
        self.assertEqual([e.message.body.decode("utf-8") for e in entries], everything)
        self.assertEqual([e.message.client_msg_id for e in entries], [s[1] for s in sent])

    @inlineCallbacks
    def test_reloadResendsPending(self):
        """
        A message whose answer never reached the page (the server stored it)
        stays pending, in C{sessionStorage} too (the page asks for
        C{noEcho}: the lost answer was its only copy, the gate skipped the
        echo); after a reload the page sends it again with the same
        clientMsgId, the server answers it as a duplicate, and the message
        is shown once and stored once.
        """
        frank = self.browser.page()
        dropped = []
        answers = []
        dropping = [True]

        def route(ws):
            # Between the page and the gate: pass everything, except the
            # answers to sends while dropping is on.
            server = ws.connect_to_server()
            sends = set()

            def fromPage(message):
                frame = _json(message)
                if frame.get("method") == "send":
                    sends.add(frame.get("seq"))
                server.send(message)

            def fromServer(message):
                frame = _json(message)
                if frame.get("kind") == "RESPONSE" and frame.get("seq") in sends:
                    sends.discard(frame.get("seq"))
                    if dropping[0]:
                        dropped.append(frame)
                        return
                    answers.append(frame)
                ws.send(message)

            ws.on_message(fromPage)
            server.on_message(fromServer)

        frank.route_web_socket("**/ws", route)
        frank.goto(self.webURL("frank"))
        expect(frank.locator("#status")).to_have_text("connected as frank")
        self.openPeer(frank, "gina")
        self.type(frank, "answer lost")
        # The message was stored (its answer was dropped on the way), but
        # with noEcho nothing else would have said so: the client still
        # waits for the answer.  (Each Playwright call lets the route above
        # run; bounded by WAIT.)
        deadline = time.monotonic() + WAIT
        while not dropped and time.monotonic() < deadline:
            frank.evaluate("0")
        self.assertEqual(self.metric("imserver_messages_stored_total"), 1)
        expect(frank.locator("#messages li.message")).to_have_attribute("data-state", "pending")
        pending = frank.evaluate("JSON.parse(sessionStorage.getItem('imserver.pending.frank'))")
        self.assertEqual(len(pending), 1)
        self.assertEqual(len(dropped), 1)

        dropping[0] = False
        frank.reload()
        expect(frank.locator("#status")).to_have_text("connected as frank")
        self.select(frank, "gina")
        self.shown(frank, ["answer lost"])
        expect(frank.locator("#messages li.message")).to_have_attribute("data-state", "confirmed")
        frank.wait_for_function("() => sessionStorage.getItem('imserver.pending.frank') === null")
        [(seq, clientMsgId, _, _)] = self.assertShownOnce(frank)
        self.assertEqual(clientMsgId, pending[0]["clientMsgId"])
        # Sent again after the reload, and answered as the original.
        [answer] = answers
        self.assertIs(answer["body"].get("duplicate"), True)
        self.assertEqual(answer["body"]["seq"], seq)
        self.assertEqual(answer["body"]["seq"], dropped[0]["body"]["seq"])
        frank.close()

        entries = yield self.inbox("gina")
        self.assertEqual([e.message.client_msg_id for e in entries], [clientMsgId])


def _json(message):
    """
    A WebSocket text message as JSON (an empty object for anything else).
    """
    if not isinstance(message, str):
        return {}
    try:
        value = json.loads(message)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
