// The imserver chat page: index.html's behaviour, on imserver.js.
//
// Sign-in comes from the URL fragment (#uid=alice&token=..., printed by
// `python -m imserver web-url`) or from the sign-in form, and is kept in
// sessionStorage for the tab.  Every page load starts from seq 0, so the
// server pushes the whole inbox it keeps: that is the history.  docs/web.md
// describes the page.

import { IMClient, decodeText, newClientMsgId } from "./imserver.js";

const STORE = {
  uid: "imserver.uid",
  token: "imserver.token",
  deviceId: "imserver.deviceId",
  selected: "imserver.selected",
};
/** How long a "typing" indicator shows after the last active signal, ms. */
const TYPING_SHOW = 5000;
/** How often an active typing signal is repeated while typing goes on, ms. */
const TYPING_REFRESH = 3000;
/**
 * The least time between two typing signals, ms: the server accepts two a
 * second per connection by default (--typing-rate) and drops the others.
 */
const TYPING_SPACING = 600;

const $ = (id) => document.getElementById(id);

const page = {
  signin: $("signin"),
  signinError: $("signin-error"),
  uid: $("uid"),
  token: $("token"),
  chat: $("chat"),
  status: $("status"),
  signout: $("signout-button"),
  banner: $("banner"),
  bannerText: $("banner-text"),
  retry: $("retry-button"),
  again: $("again-button"),
  conversations: $("conversations"),
  openForm: $("open-form"),
  newPeer: $("new-peer"),
  title: $("conversation-title"),
  messages: $("messages"),
  typing: $("typing"),
  composer: $("composer"),
  text: $("text"),
  send: $("send-button"),
  noticesSection: $("notices-section"),
  notices: $("notices"),
};

// -- sign-in ---------------------------------------------------------------------

/**
 * Take uid and token from the URL fragment into sessionStorage, and remove
 * the fragment from the address bar (and so from the history).
 */
function takeFragment() {
  if (location.hash.length <= 1) {
    return;
  }
  const params = new URLSearchParams(location.hash.slice(1));
  const uid = params.get("uid");
  const token = params.get("token");
  if (uid && token) {
    sessionStorage.setItem(STORE.uid, uid);
    sessionStorage.setItem(STORE.token, token);
  }
  history.replaceState(null, "", location.pathname + location.search);
}

/** This tab's device id: one per tab, kept across reloads. */
function deviceId() {
  let id = sessionStorage.getItem(STORE.deviceId);
  if (!id) {
    const bytes = crypto.getRandomValues(new Uint8Array(8));
    id = "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem(STORE.deviceId, id);
  }
  return id;
}

function showSignin(message = "") {
  page.chat.hidden = true;
  page.signout.hidden = true;
  page.signin.hidden = false;
  page.signinError.textContent = message;
  page.uid.value = sessionStorage.getItem(STORE.uid) || page.uid.value;
  page.status.textContent = "signed out";
  (page.uid.value ? page.token : page.uid).focus();
}

page.signin.addEventListener("submit", (event) => {
  event.preventDefault();
  const uid = page.uid.value.trim();
  const token = page.token.value.trim();
  if (!uid || !token) {
    return;
  }
  sessionStorage.setItem(STORE.uid, uid);
  sessionStorage.setItem(STORE.token, token);
  page.token.value = "";
  if (chat) {
    // Signing in again after a refused token: start from a new page, with
    // one client (the stopped one still holds the pending sends).
    location.reload();
    return;
  }
  startChat(uid);
});

page.signout.addEventListener("click", () => {
  const uid = sessionStorage.getItem(STORE.uid);
  if (chat) {
    chat.client.stop();
  }
  sessionStorage.removeItem(STORE.uid);
  sessionStorage.removeItem(STORE.token);
  sessionStorage.removeItem(STORE.selected);
  if (uid) {
    sessionStorage.removeItem(`imserver.pending.${uid}`);
  }
  location.reload();
});

// -- formatting ----------------------------------------------------------------------

function two(n) {
  return String(n).padStart(2, "0");
}

function clock(ms) {
  const d = new Date(ms);
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}

/** A body as shown: UTF-8 text for text/* or no content type, else its type and size. */
function bodyText(text, body, contentType) {
  if (text !== undefined) {
    return text;
  }
  return contentType ? `[${contentType}, ${body.length} bytes]` : decodeText(body);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

// -- the chat --------------------------------------------------------------------------

/** The running chat: one per page. */
let chat = null;

/**
 * The chat state: conversations, message records, typing indicators.
 * A record is one message as shown: {seq (null while unknown),
 * clientMsgId, sender, text, createdMs, state ("pending", "confirmed",
 * "received", "failed"), error, mine, key (conversation), order, element}.
 */
class Chat {
  constructor(client, me) {
    this.client = client;
    this.me = me;
    /** @type {Map<string, object>} key -> conversation */
    this.conversations = new Map();
    this.selected = null;
    this.bySeq = new Map();
    /** Own messages by clientMsgId. */
    this.mine = new Map();
    /** Typing indicators: "groupId\0uid" -> {uid, groupId, timer}. */
    this.typing = new Map();
    /** The typing signal this page last sent as active: {key, at}, or null. */
    this.typingSent = null;
    /** A start of typing waiting for the rate limit, or null. */
    this.typingTimer = null;
    /** When this page last sent a typing signal (ms). */
    this.lastSignalAt = 0;
    this.order = 0;
    this.groupsLoading = false;
    this.scrollPending = false;
    /**
     * Whether the messages are scrolled to the newest (then new ones
     * scroll into view; not when the user scrolled up to read).
     */
    this.atEnd = true;
    /** The detail of the client's last "state" event. */
    this.lastState = null;
    /**
     * The inbox head at the first connection: entries up to it are the
     * history, not counted as unread.
     */
    this.historyHead = Infinity;
    /** The "kicked" notification, if the server ended the session. */
    this.kicked = null;
  }

  // -- conversations --------------------------------------------------------------

  conversation(key, name) {
    let conv = this.conversations.get(key);
    if (conv === undefined) {
      const [kind, id] = key === "system" ? ["system", ""] : [key.slice(0, key.indexOf(":")), key.slice(key.indexOf(":") + 1)];
      conv = { key, kind, id, name: name || id || "Service", messages: [], unread: 0, item: null };
      this.conversations.set(key, conv);
      this.addItem(conv);
    } else if (name && conv.name !== name) {
      conv.name = name;
      this.updateItem(conv);
      this.insertItem(conv); // its place in the order may change
    }
    return conv;
  }

  sortKey(conv) {
    const rank = { group: "0", peer: "1", system: "2" }[conv.kind];
    return rank + conv.name.toLowerCase() + "\0" + conv.id;
  }

  addItem(conv) {
    const item = el("li");
    if (conv.kind === "peer") {
      item.dataset.peer = conv.id;
    } else if (conv.kind === "group") {
      item.dataset.group = conv.id;
    } else {
      item.dataset.system = "";
    }
    const button = el("button");
    button.type = "button";
    item.append(button);
    conv.item = item;
    this.updateItem(conv);
    this.insertItem(conv);
  }

  /** Put the item of `conv` at its place in the list (groups, then people, by name). */
  insertItem(conv) {
    const key = this.sortKey(conv);
    const next = [...this.conversations.values()]
      .filter((other) => other !== conv && other.item && this.sortKey(other) > key)
      .sort((a, b) => (this.sortKey(a) < this.sortKey(b) ? -1 : 1))[0];
    page.conversations.insertBefore(conv.item, next ? next.item : null);
  }

  updateItem(conv) {
    const button = conv.item.firstChild;
    button.replaceChildren();
    const label = el("span", "name");
    label.append(
      el("span", "kind", conv.kind === "group" ? "group " : conv.kind === "system" ? "" : "@"),
      document.createTextNode(conv.name),
    );
    button.append(label);
    if (conv.unread > 0 && conv.key !== this.selected) {
      const badge = el("span", "unread", String(conv.unread));
      badge.append(el("span", "visually-hidden", " unread"));
      button.append(badge);
    }
    button.setAttribute("aria-current", conv.key === this.selected ? "true" : "false");
  }

  select(key) {
    const previous = this.selected ? this.conversations.get(this.selected) : null;
    if (previous && previous.key !== key) {
      this.stopTyping();
    }
    const conv = this.conversation(key);
    this.selected = key;
    sessionStorage.setItem(STORE.selected, key);
    conv.unread = 0;
    if (previous) {
      this.updateItem(previous);
    }
    this.updateItem(conv);
    page.title.textContent =
      conv.kind === "group" ? `Group ${conv.name}` : conv.kind === "system" ? "Messages from the service" : `Chat with ${conv.name}`;
    const canWrite = conv.kind !== "system";
    page.text.disabled = !canWrite;
    page.send.disabled = !canWrite;
    this.renderMessages();
    this.renderTyping();
    if (canWrite) {
      page.text.focus();
    }
  }

  refreshGroups() {
    if (this.groupsLoading) {
      return;
    }
    this.groupsLoading = true;
    this.client
      .groups()
      .then((groups) => {
        for (const group of groups) {
          this.conversation(`group:${group.groupId}`, group.name || group.groupId);
        }
      })
      .catch((error) => console.warn("chat: could not list the groups:", error.message))
      .finally(() => {
        this.groupsLoading = false;
      });
  }

  // -- messages ---------------------------------------------------------------------

  static compare(a, b) {
    if (a.seq !== null && b.seq !== null) {
      return a.seq - b.seq;
    }
    if (a.seq !== null) {
      return -1;
    }
    if (b.seq !== null) {
      return 1;
    }
    return a.order - b.order;
  }

  /**
   * Put a record at its place in its conversation, and on screen if that
   * is open: a new one (`moved` false), or one whose seq became known.
   */
  place(record, moved = false) {
    const conv = this.conversation(record.key);
    const list = conv.messages;
    if (moved) {
      list.splice(list.indexOf(record), 1);
    }
    let i = list.length;
    while (i > 0 && Chat.compare(list[i - 1], record) > 0) {
      i -= 1;
    }
    list.splice(i, 0, record);
    if (conv.key === this.selected) {
      const next = list[i + 1];
      page.messages.insertBefore(this.element(record), next && next.element ? next.element : null);
      if (!moved && (this.atEnd || record.mine)) {
        this.scrollToEnd();
      }
    }
    return conv;
  }

  /** Scroll the messages to the newest, once per frame however many arrive. */
  scrollToEnd() {
    if (this.scrollPending) {
      return;
    }
    this.scrollPending = true;
    requestAnimationFrame(() => {
      this.scrollPending = false;
      page.messages.scrollTop = page.messages.scrollHeight;
    });
  }

  element(record) {
    if (!record.element) {
      const li = el("li", record.mine ? "message mine" : "message");
      li.append(el("time"), el("span", "sender"), el("span", "text"), el("span", "mark"));
      record.element = li;
    }
    const li = record.element;
    const [time, sender, text, mark] = li.children;
    li.dataset.seq = record.seq === null ? "" : String(record.seq);
    li.dataset.clientMsgId = record.clientMsgId;
    li.dataset.state = record.state;
    const when = new Date(record.createdMs);
    time.dateTime = Number.isNaN(when.getTime()) ? "" : when.toISOString();
    time.textContent = Number.isNaN(when.getTime()) ? "" : clock(record.createdMs);
    sender.textContent = record.sender || "service";
    text.textContent = record.text;
    mark.replaceChildren();
    if (record.mine) {
      const [glyph, words] = {
        pending: ["…", "sending"],
        confirmed: ["✓", "sent"],
        failed: ["!", `not sent: ${record.error}`],
      }[record.state] || ["", ""];
      const visible = el("span", "", glyph);
      visible.setAttribute("aria-hidden", "true");
      visible.title = words;
      mark.append(visible, el("span", "visually-hidden", words));
    }
    return li;
  }

  renderMessages() {
    this.atEnd = true;
    const conv = this.selected ? this.conversations.get(this.selected) : null;
    page.messages.setAttribute("aria-busy", "true");
    page.messages.replaceChildren(...(conv ? conv.messages.map((record) => this.element(record)) : []));
    page.messages.setAttribute("aria-busy", "false");
    this.scrollToEnd();
  }

  refresh(record) {
    if (record.element) {
      this.element(record);
    }
  }

  keyOf(message, outgoing) {
    if (message.groupId) {
      return `group:${message.groupId}`;
    }
    if (!message.sender) {
      return "system";
    }
    return `peer:${outgoing ? message.recipient : message.sender}`;
  }

  /** An inbox entry from the server (each seq once). */
  received(entry) {
    if (this.bySeq.has(entry.seq)) {
      return;
    }
    const message = entry.message;
    const own = entry.outgoing && message.clientMsgId ? this.mine.get(message.clientMsgId) : undefined;
    if (own !== undefined) {
      // Our own message, echoed from the inbox: the one shown as pending.
      this.bySeq.set(entry.seq, own);
      own.createdMs = message.createdMs;
      if (own.state !== "confirmed") {
        own.state = "confirmed";
      }
      if (own.seq !== entry.seq) {
        own.seq = entry.seq;
        this.place(own, true);
      }
      this.refresh(own);
      return;
    }
    const key = this.keyOf(message, entry.outgoing);
    if (message.groupId && !this.conversations.has(key)) {
      this.refreshGroups();
    }
    const record = {
      seq: entry.seq,
      clientMsgId: message.clientMsgId,
      sender: message.sender,
      text: bodyText(message.text, message.body, message.contentType),
      createdMs: message.createdMs,
      state: entry.outgoing ? "confirmed" : "received",
      error: "",
      mine: entry.outgoing,
      key,
      order: this.order++,
      element: null,
    };
    this.bySeq.set(entry.seq, record);
    if (record.mine && record.clientMsgId) {
      this.mine.set(record.clientMsgId, record);
    }
    const conv = this.place(record);
    if (!record.mine && message.sender) {
      this.clearTyping(message.sender, message.groupId);
    }
    if (!record.mine && conv.key !== this.selected && entry.seq > this.historyHead) {
      conv.unread += 1;
      this.updateItem(conv);
    }
  }

  /** A message typed here, or restored from storage after a reload: pending. */
  pending({ clientMsgId, to, groupId, text, createdMs }) {
    const record = {
      seq: null,
      clientMsgId,
      sender: this.me,
      text,
      createdMs,
      state: "pending",
      error: "",
      mine: true,
      key: groupId ? `group:${groupId}` : `peer:${to}`,
      order: this.order++,
      element: null,
    };
    this.mine.set(clientMsgId, record);
    this.place(record);
    return record;
  }

  sent({ clientMsgId, response }) {
    const record = this.mine.get(clientMsgId);
    if (record === undefined) {
      return;
    }
    record.state = "confirmed";
    record.createdMs = response.serverTimeMs;
    if (record.seq === null) {
      record.seq = response.seq;
      if (!this.bySeq.has(response.seq)) {
        this.bySeq.set(response.seq, record);
      }
      this.place(record, true);
    }
    this.refresh(record);
  }

  sendFailed({ clientMsgId, error }) {
    const record = this.mine.get(clientMsgId);
    if (record !== undefined) {
      record.state = "failed";
      record.error = error.code;
      this.refresh(record);
    }
  }

  send(text) {
    const conv = this.selected ? this.conversations.get(this.selected) : null;
    if (!conv || conv.kind === "system" || !text.trim()) {
      return false;
    }
    const clientMsgId = newClientMsgId();
    const target = conv.kind === "group" ? { groupId: conv.id } : { to: conv.id };
    this.pending({ clientMsgId, ...target, text, createdMs: Date.now() });
    // The outcome comes as the client's "sent" or "sendfailed" event.
    this.client.send({ ...target, text, clientMsgId }).catch(() => {});
    this.stopTyping();
    if (this.lastState && this.lastState.state !== "connected") {
      this.stateChanged(this.lastState); // count it in the banner
    }
    return true;
  }

  // -- typing --------------------------------------------------------------------

  typingTarget(key) {
    const conv = this.conversations.get(key);
    if (!conv || conv.kind === "system") {
      return null;
    }
    return conv.kind === "group" ? ["", conv.id] : [conv.id, ""];
  }

  /** The text field changed: signal typing to the selected conversation. */
  typed() {
    if (!this.selected) {
      return;
    }
    if (!page.text.value.trim()) {
      this.stopTyping();
      return;
    }
    const sent = this.typingSent;
    if (sent && sent.key !== this.selected) {
      this.stopTyping();
    } else if (this.typingTimer !== null) {
      return; // a start is on its way
    } else if (sent && Date.now() - sent.at < TYPING_REFRESH) {
      return;
    }
    this.startTyping(this.selected);
  }

  /**
   * Send an active typing signal to `key`, no sooner than TYPING_SPACING
   * after the last signal: the server drops signals that come faster
   * (docs/protocol.md section 7.4), and a dropped start would leave the
   * peer without the indicator until the next refresh.
   */
  startTyping(key) {
    const wait = this.lastSignalAt + TYPING_SPACING - Date.now();
    if (wait > 0) {
      this.typingTimer = setTimeout(() => {
        this.typingTimer = null;
        if (this.selected === key && page.text.value.trim()) {
          this.startTyping(key);
        }
      }, wait);
      return;
    }
    const target = this.typingTarget(key);
    if (target && this.client.typing(target[0], true, target[1])) {
      const now = Date.now();
      this.typingSent = { key, at: now };
      this.lastSignalAt = now;
    }
  }

  stopTyping() {
    clearTimeout(this.typingTimer);
    this.typingTimer = null;
    const sent = this.typingSent;
    this.typingSent = null;
    const target = sent && this.typingTarget(sent.key);
    // A stop right after a start always passes the server's rate limit.
    if (target && this.client.typing(target[0], false, target[1])) {
      this.lastSignalAt = Date.now();
    }
  }

  typingSignal({ uid, active, groupId }) {
    const key = `${groupId}\0${uid}`;
    const current = this.typing.get(key);
    if (current) {
      clearTimeout(current.timer);
    }
    if (active) {
      const timer = setTimeout(() => this.clearTyping(uid, groupId), TYPING_SHOW);
      this.typing.set(key, { uid, groupId, timer });
    } else {
      this.typing.delete(key);
    }
    this.renderTyping();
  }

  clearTyping(uid, groupId) {
    const key = `${groupId}\0${uid}`;
    const current = this.typing.get(key);
    if (current) {
      clearTimeout(current.timer);
      this.typing.delete(key);
      this.renderTyping();
    }
  }

  renderTyping() {
    const conv = this.selected ? this.conversations.get(this.selected) : null;
    const who = [];
    if (conv) {
      for (const { uid, groupId } of this.typing.values()) {
        const here = conv.kind === "group" ? groupId === conv.id : conv.kind === "peer" && !groupId && uid === conv.id;
        if (here) {
          who.push(uid);
        }
      }
    }
    let text = "";
    if (who.length === 1) {
      text = `${who[0]} is typing…`;
    } else if (who.length === 2) {
      text = `${who[0]} and ${who[1]} are typing…`;
    } else if (who.length > 2) {
      text = `${who[0]}, ${who[1]} and ${who.length - 2} others are typing…`;
    }
    if (page.typing.textContent !== text) {
      page.typing.textContent = text;
    }
  }

  // -- connection state ---------------------------------------------------------------

  stateChanged(detail) {
    this.lastState = detail;
    const { state, retryAt, error } = detail;
    const me = this.me;
    const waiting = this.client.pendingSends().length;
    const waitingText = waiting ? ` ${waiting} message${waiting === 1 ? "" : "s"} waiting to be sent.` : "";
    page.retry.hidden = true;
    page.again.hidden = true;
    if (state === "connected") {
      if (this.historyHead === Infinity) {
        this.historyHead = detail.session.headSeq;
      }
      page.status.textContent = `connected as ${me}`;
      page.banner.hidden = true;
      page.bannerText.textContent = "";
      this.refreshGroups();
    } else if (state === "connecting") {
      page.status.textContent = `connecting as ${me}…`;
      page.bannerText.textContent = `Connecting…${waitingText}`;
      page.banner.hidden = false;
    } else if (state === "disconnected") {
      page.status.textContent = `offline (${me})`;
      const why = error ? ` (${error.code})` : "";
      page.bannerText.textContent = `Connection lost${why}. Reconnecting in ${Math.ceil(Math.max(0, retryAt - Date.now()) / 1000)} s.${waitingText}`;
      page.retry.hidden = false;
      page.banner.hidden = false;
    } else if (state === "stopped") {
      page.status.textContent = `stopped (${me})`;
      if (error && error.code === "KICKED") {
        const kick = this.kicked || { reason: "", message: "" };
        page.bannerText.textContent =
          kick.reason === "REPLACED"
            ? "Signed out: this device signed in again elsewhere (another tab with a copy of this one?)."
            : `Signed out by the server${kick.message ? ": " + kick.message : ""}.`;
        page.again.hidden = false;
        page.banner.hidden = false;
      }
    }
  }
}

function startChat(uid) {
  page.signin.hidden = true;
  page.chat.hidden = false;
  page.signout.hidden = false;
  page.status.textContent = `connecting as ${uid}…`;
  const client = new IMClient({
    uid,
    token: () => sessionStorage.getItem(STORE.token) || "",
    deviceId: deviceId(),
    lastSeq: 0,
    storage: sessionStorage,
    // Own messages are shown from the send and its answer ("sent"): the
    // gate need not push them back to this page.
    noEcho: true,
  });
  chat = new Chat(client, uid);
  for (const sending of client.pendingSends()) {
    chat.pending({ ...sending, text: bodyText(sending.text, sending.body, sending.contentType) });
  }
  client.on("message", (entry) => chat.received(entry));
  client.on("sent", (detail) => chat.sent(detail));
  client.on("sendfailed", (detail) => chat.sendFailed(detail));
  client.on("typing", (detail) => chat.typingSignal(detail));
  client.on("notice", (notice) => {
    const text = bodyText(notice.text, notice.body, notice.contentType);
    const item = el("li", "", `${clock(notice.serverTimeMs || Date.now())} ${text}`);
    page.notices.append(item);
    page.noticesSection.hidden = false;
  });
  client.on("kicked", (detail) => {
    chat.kicked = detail;
  });
  client.on("state", (detail) => chat.stateChanged(detail));
  client.on("stopped", ({ error }) => {
    if (error.code === "AUTH_FAILED" || error.code === "BAD_REQUEST") {
      sessionStorage.removeItem(STORE.token);
      showSignin(
        error.code === "AUTH_FAILED"
          ? "The server refused the token (wrong, expired or for another user). Sign in with a new one."
          : `The server refused the sign-in: ${error.message}`,
      );
      page.banner.hidden = true;
    }
  });
  const selected = sessionStorage.getItem(STORE.selected);
  if (selected && (selected === "system" || /^(peer|group):./.test(selected))) {
    chat.select(selected);
  }
  client.start();
}

// -- page events ------------------------------------------------------------------------

page.conversations.addEventListener("click", (event) => {
  const item = event.target.closest("li");
  if (!chat || !item) {
    return;
  }
  if (item.dataset.peer !== undefined) {
    chat.select(`peer:${item.dataset.peer}`);
  } else if (item.dataset.group !== undefined) {
    chat.select(`group:${item.dataset.group}`);
  } else if (item.dataset.system !== undefined) {
    chat.select("system");
  }
});

page.openForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const peer = page.newPeer.value.trim();
  if (chat && peer) {
    page.newPeer.value = "";
    chat.select(`peer:${peer}`);
  }
});

page.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  if (chat && chat.send(page.text.value)) {
    page.text.value = "";
  }
});

page.messages.addEventListener("scroll", () => {
  if (chat) {
    const box = page.messages;
    chat.atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  }
});

page.text.addEventListener("input", () => {
  if (chat) {
    chat.typed();
  }
});

page.retry.addEventListener("click", () => {
  if (chat) {
    chat.client.reconnectNow();
  }
});

page.again.addEventListener("click", () => {
  // A new device id: the old one is signed in elsewhere (another tab that
  // copied this tab's sessionStorage, for one).
  sessionStorage.removeItem(STORE.deviceId);
  location.reload();
});

takeFragment();
const signedIn = sessionStorage.getItem(STORE.uid);
if (signedIn && sessionStorage.getItem(STORE.token)) {
  startChat(signedIn);
} else {
  showSignin();
}
