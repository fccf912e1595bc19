// imserver.js: the imserver client for browsers, over WebSocket.
//
// An ES module with no dependencies.  It speaks the JSON form of the
// protocol (subprotocol "imserver.v1.json", docs/protocol.md section
// "WebSocket") and keeps the same delivery contract as the Python
// imserver.client.IMClient (docs/protocol.md sections 15 and 16): resume
// from the last seq handed to the application, duplicates dropped by seq,
// cumulative acks, pending sends re-sent with the same clientMsgId after
// every reconnect, reconnection with full-jitter backoff.
//
// docs/web.md describes the API with an example.

/** The WebSocket subprotocol this module speaks. */
export const SUBPROTOCOL = "imserver.v1.json";

/** Sent as AuthRequest.clientVersion. */
export const CLIENT_VERSION = "imserver.js/1";

/**
 * ErrorCode names by number (proto/im.proto), for the close codes
 * 4000 + code the server closes a WebSocket with after an ERROR frame.
 */
export const ERROR_CODES = Object.freeze({
  0: "ERROR_CODE_UNSPECIFIED",
  1: "BAD_FRAME",
  2: "FRAME_TOO_LARGE",
  3: "EMPTY_FRAME",
  4: "AUTH_TIMEOUT",
  5: "IDLE_TIMEOUT",
  6: "SERVER_SHUTDOWN",
  7: "DUPLICATE_SEQ",
  8: "BAD_ACK",
  9: "SLOW_CONSUMER",
  20: "UNKNOWN_METHOD",
  21: "BAD_REQUEST",
  22: "NOT_AUTHENTICATED",
  23: "AUTH_FAILED",
  24: "ALREADY_AUTHENTICATED",
  25: "TOO_MANY_DEVICES",
  26: "INTERNAL",
  27: "TIMEOUT",
  28: "MESSAGE_TOO_LARGE",
  29: "UNAVAILABLE",
  30: "NOT_MEMBER",
  31: "RATE_LIMITED",
  32: "REJECTED",
});

/** Error codes after which a send is given up: the request itself is wrong. */
const FINAL_SEND_ERRORS = new Set(["BAD_REQUEST", "MESSAGE_TOO_LARGE", "UNKNOWN_METHOD", "NOT_MEMBER", "REJECTED"]);
/** Error codes of an auth refusal after which reconnecting is pointless. */
const FINAL_AUTH_ERRORS = new Set(["AUTH_FAILED", "BAD_REQUEST"]);
/** Largest request seq (Frame.seq is a uint32; 0 is never valid). */
const MAX_REQUEST_SEQ = 0xffffffff;
/** The push window assumed until the auth response tells the real one. */
const DEFAULT_MAX_UNACKED = 64;
/** Delay before a send refused with a retryable error is sent again, ms. */
const SEND_RETRY_DELAY = 1000;

/**
 * An error of a request or of the connection.
 *
 * `code` is an ErrorCode name from the server ("AUTH_FAILED",
 * "NOT_MEMBER", ...), or one of the local codes "TIMEOUT" (no answer within
 * the request timeout), "DISCONNECTED" (the connection was lost, or there
 * was none) and "KICKED".
 */
export class IMError extends Error {
  /**
   * @param {string} code
   * @param {string} [message]
   */
  constructor(code, message) {
    super(message ? `${code}: ${message}` : code);
    this.name = "IMError";
    /** @type {string} */
    this.code = code;
  }
}

// -- helpers ------------------------------------------------------------------

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8");

/**
 * Standard base64 (with padding) of bytes.
 * @param {Uint8Array} bytes
 * @returns {string}
 */
export function bytesToBase64(bytes) {
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}

/**
 * The bytes of standard base64 text.
 * @param {string} text
 * @returns {Uint8Array}
 * @throws {DOMException} if it is not base64
 */
export function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) {
    bytes[i] = binary.charCodeAt(i);
  }
  return bytes;
}

/**
 * @param {string} text
 * @returns {Uint8Array} its UTF-8 bytes
 */
export function encodeText(text) {
  return utf8Encoder.encode(text);
}

/**
 * @param {Uint8Array} bytes UTF-8 (invalid sequences become U+FFFD)
 * @returns {string}
 */
export function decodeText(bytes) {
  return utf8Decoder.decode(bytes);
}

/**
 * The WebSocket URL of the gate that served a page: `/ws` beside it, ws:
 * on http and wss: on https.  No credentials are put in it.
 * @param {Location|URL|string} [location] default: the current page
 * @returns {string}
 */
export function webSocketURL(location = globalThis.location) {
  const url = new URL("ws", String(location));
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.hash = "";
  url.search = "";
  return url.href;
}

/**
 * Full-jitter backoff: a delay uniform in [0, min(max, initial * 2^attempt)].
 * @param {number} attempt failures in a row (0 after a connection that was up)
 * @param {{initial?: number, max?: number, random?: () => number}} [options] in ms
 * @returns {number} milliseconds
 */
export function fullJitterBackoff(attempt, { initial = 500, max = 30000, random = Math.random } = {}) {
  return random() * Math.min(max, initial * 2 ** Math.min(attempt, 32));
}

/**
 * A new random client_msg_id (a UUID v4), also outside secure contexts,
 * where crypto.randomUUID is missing.
 * @returns {string}
 */
export function newClientMsgId() {
  if (typeof crypto.randomUUID === "function") {
    return crypto.randomUUID();
  }
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// -- conversions of what the server sends (canonical JSON: 64-bit integers as
// strings, defaults omitted) --------------------------------------------------

function u64(value) {
  return value === undefined || value === null || value === "" ? 0 : Number(value);
}

function str(value) {
  return typeof value === "string" ? value : "";
}

/**
 * @typedef {object} Message
 * @property {number} id the server's message id
 * @property {string} sender uid; "" for the system sender (the app backend)
 * @property {string} recipient uid; "" for a group or multi-recipient message
 * @property {string} groupId "" unless a group message
 * @property {string} clientMsgId the sender's idempotency key
 * @property {Uint8Array} body
 * @property {string} contentType
 * @property {string|undefined} text the body decoded as UTF-8 when contentType starts with "text/"
 * @property {number} createdMs Unix epoch milliseconds
 */

/**
 * @typedef {object} InboxEntry
 * @property {number} seq the entry's seq in this user's inbox
 * @property {boolean} outgoing true: this user sent it (from any device)
 * @property {Message} message
 */

function isText(contentType) {
  return contentType.toLowerCase().startsWith("text/");
}

function convertMessage(m = {}) {
  const body = base64ToBytes(str(m.body));
  const contentType = str(m.contentType);
  return {
    id: u64(m.id),
    sender: str(m.sender),
    recipient: str(m.recipient),
    groupId: str(m.groupId),
    clientMsgId: str(m.clientMsgId),
    body,
    contentType,
    text: isText(contentType) ? decodeText(body) : undefined,
    createdMs: u64(m.createdMs),
  };
}

function convertEntry(e) {
  const seq = u64(e.seq);
  if (!(seq > 0)) {
    throw new TypeError("inbox entry without a seq");
  }
  return { seq, outgoing: e.outgoing === true, message: convertMessage(e.message) };
}

function convertAuthResponse(r) {
  return {
    heartbeatIntervalMs: Number(r.heartbeatIntervalMs || 0),
    idleTimeoutMs: Number(r.idleTimeoutMs || 0),
    serverTimeMs: u64(r.serverTimeMs),
    sessionId: str(r.sessionId),
    maxFrameLength: Number(r.maxFrameLength || 0),
    headSeq: u64(r.headSeq),
    maxMessageBody: Number(r.maxMessageBody || 0),
    maxUnacked: Number(r.maxUnacked || 0),
  };
}

function convertSendResponse(r) {
  return {
    messageId: u64(r.messageId),
    serverTimeMs: u64(r.serverTimeMs),
    seq: u64(r.seq),
    duplicate: r.duplicate === true,
    echoSkipped: r.echoSkipped === true,
  };
}

function convertGroup(g) {
  return {
    groupId: str(g.groupId),
    name: str(g.name),
    role: str(g.role) || "ROLE_UNSPECIFIED",
    memberCount: Number(g.memberCount || 0),
    createdMs: u64(g.createdMs),
  };
}

function convertMember(m) {
  return { uid: str(m.uid), role: str(m.role) || "ROLE_UNSPECIFIED", joinedMs: u64(m.joinedMs) };
}

function errorOf(error) {
  const code = error && typeof error.code === "string" ? error.code : String((error && error.code) ?? "ERROR_CODE_UNSPECIFIED");
  return new IMError(code, error ? str(error.message) : "");
}

// -- one connection ---------------------------------------------------------------

/**
 * One WebSocket to a gate: JSON frames, the table of outstanding requests
 * with their timeouts, the heartbeat, coalesced acks.  It knows nothing of
 * sessions: IMClient authenticates and reconnects.
 * @private
 */
class Connection {
  constructor(ws, { requestTimeout, ackDelay, onOpen, onNotify, onClosed }) {
    this.ws = ws;
    this.requestTimeout = requestTimeout;
    this.ackDelay = ackDelay;
    this.onNotify = onNotify;
    this.onClosed = onClosed;
    this.authenticated = false;
    this.closed = false;
    /** @type {IMError|null} the ERROR frame the server sent, if any */
    this.error = null;
    this.maxUnacked = DEFAULT_MAX_UNACKED;
    this._outstanding = new Map();
    this._nextSeq = 1;
    this._lastSent = Date.now();
    this._heartbeat = null;
    this._heartbeatInterval = 0;
    this._ackSeq = 0;
    this._ackPending = 0;
    this._ackTimer = null;
    ws.onopen = () => {
      this._lastSent = Date.now();
      onOpen(this);
    };
    ws.onmessage = (event) => this._received(event.data);
    ws.onclose = (event) => this._lost({ closeCode: event.code, closeReason: event.reason });
    ws.onerror = () => {}; // a close event follows
  }

  get open() {
    return !this.closed && this.ws.readyState === 1;
  }

  _write(frame) {
    if (!this.open) {
      return false;
    }
    this.ws.send(JSON.stringify(frame));
    this._lastSent = Date.now();
    return true;
  }

  _allocateSeq() {
    for (;;) {
      const seq = this._nextSeq;
      this._nextSeq = seq >= MAX_REQUEST_SEQ ? 1 : seq + 1;
      if (!this._outstanding.has(seq)) {
        return seq;
      }
    }
  }

  /**
   * Call a method; `callback(error, body)` runs synchronously when the
   * answer is processed (before any later frame).
   */
  call(method, body, callback, timeout = this.requestTimeout) {
    if (!this.open) {
      callback(this.error || new IMError("DISCONNECTED", "not connected"));
      return;
    }
    const seq = this._allocateSeq();
    const timer = setTimeout(() => {
      if (this._outstanding.get(seq)?.timer === timer) {
        this._outstanding.delete(seq);
        callback(new IMError("TIMEOUT", `no answer to ${method} within ${timeout} ms`));
      }
    }, timeout);
    this._outstanding.set(seq, { method, callback, timer });
    this._write({ kind: "REQUEST", seq, method, body });
  }

  /** A Promise of the response body of a method. */
  request(method, body, timeout) {
    return new Promise((resolve, reject) => {
      this.call(method, body, (error, result) => (error ? reject(error) : resolve(result)), timeout);
    });
  }

  notify(method, body) {
    return this._write({ kind: "NOTIFY", method, body });
  }

  _received(data) {
    if (this.closed) {
      return;
    }
    let frame;
    try {
      if (typeof data !== "string") {
        throw new TypeError("binary WebSocket message");
      }
      frame = JSON.parse(data);
      if (frame === null || typeof frame !== "object") {
        throw new TypeError("a frame is not a JSON object");
      }
    } catch (e) {
      // The stream is corrupt: drop the connection (a new one resumes).
      console.warn("imserver: dropping the connection: unreadable frame:", e.message);
      this.abort(new IMError("BAD_FRAME", e.message));
      return;
    }
    switch (frame.kind) {
      case "RESPONSE": {
        const outstanding = this._outstanding.get(frame.seq);
        if (outstanding === undefined) {
          console.debug("imserver: dropping a response to unknown request seq", frame.seq);
          return;
        }
        this._outstanding.delete(frame.seq);
        clearTimeout(outstanding.timer);
        if (frame.error) {
          outstanding.callback(errorOf(frame.error));
        } else {
          outstanding.callback(null, frame.body || {});
        }
        return;
      }
      case "NOTIFY":
        this.onNotify(this, str(frame.method), frame.body || {});
        return;
      case "REQUEST":
        // The server sends none in v1; answer as the protocol asks.
        if (frame.method === "ping") {
          this._write({ kind: "RESPONSE", seq: frame.seq, body: { serverTimeMs: String(Date.now()) } });
        } else {
          this._write({
            kind: "RESPONSE",
            seq: frame.seq,
            error: { code: "UNKNOWN_METHOD", message: "no such method" },
          });
        }
        return;
      case "ERROR":
        // Connection-level: the server closes right after it.
        this.abort(errorOf(frame.error));
        return;
      default:
        console.debug("imserver: ignoring a frame of kind", frame.kind);
    }
  }

  // -- heartbeat --------------------------------------------------------------

  /** Ping whenever nothing was sent for `interval` ms; drop the connection if unanswered within it. */
  startHeartbeat(interval) {
    this._heartbeatInterval = interval;
    if (interval > 0) {
      this._heartbeat = setTimeout(() => this._beat(), interval);
    }
  }

  _beat() {
    this._heartbeat = null;
    if (this.closed) {
      return;
    }
    const interval = this._heartbeatInterval;
    const idle = Date.now() - this._lastSent;
    if (idle < interval) {
      this._heartbeat = setTimeout(() => this._beat(), interval - idle);
      return;
    }
    this.call(
      "ping",
      {},
      (error) => {
        if (error && error.code === "TIMEOUT" && !this.closed) {
          console.warn("imserver: the server did not answer a ping in time; dropping the connection");
          this.abort(new IMError("TIMEOUT", "ping not answered"));
        }
      },
      interval,
    );
    this._heartbeat = setTimeout(() => this._beat(), interval);
  }

  // -- acks ---------------------------------------------------------------------

  /**
   * An entry of this connection was processed or dropped: ack it, coalesced
   * (docs/protocol.md section 16, step 4): at once when half the window is
   * pending, else when no message has come for `ackDelay` ms.
   */
  processed(seq) {
    if (seq > this._ackSeq) {
      this._ackSeq = seq;
    }
    this._ackPending += 1;
    if (this._ackPending >= Math.max(1, Math.floor(this.maxUnacked / 2))) {
      this.flushAck();
      return;
    }
    clearTimeout(this._ackTimer);
    this._ackTimer = setTimeout(() => this.flushAck(), this.ackDelay);
  }

  flushAck() {
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    if (this._ackPending > 0 && this._ackSeq > 0) {
      this._ackPending = 0;
      this.notify("ack", { seq: String(this._ackSeq) });
    }
  }

  /** Ack `seq` now (an explicit ack). */
  ack(seq) {
    if (seq >= this._ackSeq) {
      this._ackSeq = seq;
      this._ackPending = 0;
      clearTimeout(this._ackTimer);
      this._ackTimer = null;
    }
    return this.notify("ack", { seq: String(seq) });
  }

  // -- closing ------------------------------------------------------------------

  /** Close now and report the connection lost at once (without waiting for the close handshake). */
  abort(error, closeCode = 1000) {
    if (this.closed) {
      return;
    }
    if (error) {
      this.error = error;
    }
    const ws = this.ws;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(closeCode);
    } catch (e) {
      // already closing
    }
    this._lost({ closeCode: 1006, closeReason: "", local: true });
  }

  _lost({ closeCode, closeReason, local = false }) {
    if (this.closed) {
      return;
    }
    this.closed = true;
    clearTimeout(this._heartbeat);
    clearTimeout(this._ackTimer);
    if (!this.error && closeCode >= 4000 && closeCode < 5000) {
      const code = closeCode - 4000;
      this.error = new IMError(ERROR_CODES[code] || String(code), closeReason);
    }
    const error = this.error || new IMError("DISCONNECTED", `connection closed (${closeCode}${closeReason ? " " + closeReason : ""})`);
    // The client learns of the loss first, then outstanding requests fail
    // (so they are not retried on this connection).
    this.onClosed(this, { error, closeCode, local });
    const outstanding = this._outstanding;
    this._outstanding = new Map();
    for (const { callback, timer } of outstanding.values()) {
      clearTimeout(timer);
      callback(error);
    }
  }
}

// -- the client session ----------------------------------------------------------

/**
 * A client session that survives disconnects.
 *
 * It reconnects by itself (full-jitter backoff), authenticates with the
 * last inbox seq it has handed to the application so the server resumes
 * right after it, hands every inbox entry to the "message" listeners once
 * (duplicates are recognised by seq and dropped), acknowledges entries
 * after the listeners return (unless `autoAck` is false: then call ack()),
 * and re-sends unanswered messages with the same clientMsgId after every
 * reconnect, so a message is stored once however often it is sent.
 *
 * It stops reconnecting when the token is refused (AUTH_FAILED, or
 * BAD_REQUEST on auth) or the session is kicked: a "stopped" event tells
 * the reason.
 *
 * Events (listen with addEventListener(type, e => ...) and read e.detail,
 * or with on(type, detail => ...)):
 * - "message": an {@link InboxEntry}, in seq order, once per seq;
 * - "sent": {clientMsgId, response}: a send was answered (also the ones
 *   restored from storage, which have no Promise);
 * - "sendfailed": {clientMsgId, error}: a send was given up;
 * - "typing": {uid, active, groupId};
 * - "notice": {body (Uint8Array), contentType, text, serverTimeMs}; never acked;
 * - "kicked": {reason, message};
 * - "state": {state: "connecting"|"connected"|"disconnected"|"stopped",
 *   attempt, retryInMs, retryAt (epoch ms) and error (disconnected),
 *   session (connected)};
 * - "stopped": {error}: the client gave up by itself (an IMError whose
 *   code is AUTH_FAILED, BAD_REQUEST or KICKED).
 */
export class IMClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} [options.url] the gate's WebSocket URL (default: /ws beside the page)
   * @param {string} options.uid
   * @param {string|(() => string|Promise<string>)} options.token the token, or a
   *   function returning it (or a Promise of it), asked before each connection
   * @param {string} options.deviceId stable per installation (or browser tab)
   * @param {string} [options.platform] a Platform name, default "WEB"
   * @param {number} [options.lastSeq] the highest inbox seq already processed (0: all)
   * @param {boolean} [options.autoAck] ack each entry after the listeners return (default true)
   * @param {number} [options.requestTimeout] ms, default 10000
   * @param {Storage|null} [options.storage] where pending sends are kept (e.g.
   *   sessionStorage), so that a reload sends them again; null: memory only
   * @param {string} [options.storageKey] the storage item (default "imserver.pending.<uid>")
   * @param {number} [options.maxSendAge] ms a send is retried before it fails with
   *   TIMEOUT (default 3600000; keep it well below the server's dedup window)
   * @param {number} [options.ackDelay] ms without a new message before acking (default 100)
   * @param {boolean} [options.noEcho] this client's own sends reach the application
   *   only as their "sent" events, never as "message" events: the server is asked
   *   not to push them back (AuthRequest.noEcho, docs/protocol.md section 6.3), and
   *   those it pushes all the same are acked and not emitted (default false)
   * @param {(attempt: number) => number} [options.backoff] reconnect delay in ms
   * @param {typeof WebSocket} [options.WebSocket] the WebSocket class to use
   */
  constructor({
    url,
    uid,
    token,
    deviceId,
    platform = "WEB",
    lastSeq = 0,
    autoAck = true,
    requestTimeout = 10000,
    storage = null,
    storageKey,
    maxSendAge = 3600000,
    ackDelay = 100,
    noEcho = false,
    backoff = fullJitterBackoff,
    WebSocket = globalThis.WebSocket,
  }) {
    super();
    if (!uid || !deviceId) {
      throw new TypeError("IMClient needs a uid and a deviceId");
    }
    this.url = url || webSocketURL();
    this.uid = uid;
    this.deviceId = deviceId;
    this.platform = platform;
    /** The highest inbox seq handed to the application. */
    this.lastSeq = Number(lastSeq) || 0;
    this.autoAck = autoAck;
    this.requestTimeout = requestTimeout;
    this.maxSendAge = maxSendAge;
    this.ackDelay = ackDelay;
    this.noEcho = noEcho === true;
    /** With noEcho: seqs above lastSeq of own sends the server may still push. */
    this._ownSeqs = new Set();
    /** The reason the client gave up by itself (an IMError), or null. */
    this.stopReason = null;
    /** The AuthResponse of the current connection (numbers converted), or null. */
    this.session = null;
    this._token = token;
    this._storage = storage;
    this._storageKey = storageKey || `imserver.pending.${uid}`;
    this._backoff = backoff;
    this._WebSocket = WebSocket;
    this._running = false;
    this._generation = 0;
    this._conn = null;
    this._failures = 0;
    this._retryTimer = null;
    this._state = "stopped";
    /** @type {Map<string, object>} clientMsgId -> pending send, in send order */
    this._pending = new Map();
    this._restorePending();
  }

  /** "connecting", "connected", "disconnected" or "stopped". */
  get state() {
    return this._state;
  }

  /** Whether a connection is authenticated now. */
  get connected() {
    return this._conn !== null && this._conn.authenticated && !this._conn.closed;
  }

  /**
   * Listen to an event's detail.
   * @param {string} type
   * @param {(detail: any) => void} listener
   * @returns {() => void} a function that removes the listener
   */
  on(type, listener) {
    const wrapped = (event) => listener(event.detail);
    this.addEventListener(type, wrapped);
    return () => this.removeEventListener(type, wrapped);
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _setState(state, detail = {}) {
    this._state = state;
    this._emit("state", { state, ...detail });
  }

  // -- life ------------------------------------------------------------------------

  /** Start connecting, and keep connected until stop(). */
  start() {
    if (this._running) {
      return;
    }
    this._running = true;
    this.stopReason = null;
    this._failures = 0;
    this._generation += 1;
    this._connect(this._generation);
  }

  /**
   * Disconnect and stop reconnecting.  Pending sends stay pending (and in
   * storage) until start() is called again; outstanding requests fail
   * with DISCONNECTED.
   */
  stop() {
    this._halt();
    this._setState("stopped");
  }

  /** Reconnect now if waiting to reconnect (skipping the rest of the backoff delay). */
  reconnectNow() {
    if (this._running && this._retryTimer !== null) {
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      this._connect(this._generation);
    }
  }

  _halt() {
    this._running = false;
    this._generation += 1;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    for (const pending of this._pending.values()) {
      clearTimeout(pending.retry);
      pending.retry = null;
    }
    const conn = this._conn;
    if (conn !== null) {
      if (conn.authenticated) {
        conn.flushAck();
      }
      conn.abort(new IMError("DISCONNECTED", "stopped"));
    }
  }

  _giveUp(error) {
    if (!this._running) {
      return;
    }
    this.stopReason = error;
    console.warn(`imserver: ${this.uid}/${this.deviceId} stops reconnecting: ${error.message}`);
    this._halt();
    this._setState("stopped", { error });
    this._emit("stopped", { error });
  }

  async _connect(generation) {
    this._setState("connecting", { attempt: this._failures });
    let token;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
    } catch (e) {
      if (generation === this._generation) {
        console.warn("imserver: could not get a token:", e && e.message);
        this._scheduleReconnect(new IMError("DISCONNECTED", "no token"), false);
      }
      return;
    }
    if (generation !== this._generation) {
      return;
    }
    let ws;
    try {
      ws = new this._WebSocket(this.url, [SUBPROTOCOL]);
    } catch (e) {
      this._giveUp(new IMError("BAD_REQUEST", `cannot open ${this.url}: ${e.message}`));
      return;
    }
    this._conn = new Connection(ws, {
      requestTimeout: this.requestTimeout,
      ackDelay: this.ackDelay,
      onOpen: (conn) => this._authenticate(conn, String(token)),
      onNotify: (conn, method, body) => this._notified(conn, method, body),
      onClosed: (conn, info) => this._connectionLost(conn, info),
    });
  }

  _authenticate(conn, token) {
    const request = {
      uid: this.uid,
      token,
      deviceId: this.deviceId,
      platform: this.platform,
      lastSeq: String(this.lastSeq),
      clientVersion: CLIENT_VERSION,
    };
    if (this.noEcho) {
      request.noEcho = true;
    }
    conn.call("auth", request, (error, body) => {
      if (error) {
        this._authFailed(conn, error);
      } else {
        this._authenticated(conn, convertAuthResponse(body));
      }
    });
  }

  _authenticated(conn, session) {
    if (conn !== this._conn || conn.closed) {
      return;
    }
    if (session.headSeq < this.lastSeq) {
      // The server's inbox is behind what we have seen (it lost or restored
      // data): follow it, or its new entries would look like duplicates.
      console.warn(`imserver: server inbox head ${session.headSeq} is below our last seq ${this.lastSeq}; following it`);
      this.lastSeq = session.headSeq;
    }
    conn.authenticated = true;
    conn.maxUnacked = session.maxUnacked || DEFAULT_MAX_UNACKED;
    conn.startHeartbeat(session.heartbeatIntervalMs);
    this.session = session;
    this._failures = 0;
    this._setState("connected", { session });
    for (const clientMsgId of [...this._pending.keys()]) {
      this._transmit(clientMsgId);
    }
  }

  _authFailed(conn, error) {
    if (FINAL_AUTH_ERRORS.has(error.code)) {
      this._giveUp(error);
    } else if (!conn.closed) {
      // UNAVAILABLE, INTERNAL, TOO_MANY_DEVICES, RATE_LIMITED, TIMEOUT:
      // reconnect with backoff (the refusal counts as a failure).
      console.info(`imserver: auth failed (${error.code}); reconnecting`);
      conn.abort(error);
    }
  }

  _connectionLost(conn, { error }) {
    if (conn !== this._conn) {
      return;
    }
    this._conn = null;
    this.session = null;
    for (const pending of this._pending.values()) {
      clearTimeout(pending.retry);
      pending.retry = null;
      pending.inflight = false;
    }
    if (this._running) {
      this._scheduleReconnect(error, conn.authenticated);
    }
  }

  _scheduleReconnect(error, wasUp) {
    if (!wasUp) {
      this._failures += 1;
    }
    const delay = Math.round(this._backoff(this._failures));
    this._setState("disconnected", { attempt: this._failures, retryInMs: delay, retryAt: Date.now() + delay, error });
    clearTimeout(this._retryTimer);
    const generation = this._generation;
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (generation === this._generation) {
        this._connect(generation);
      }
    }, delay);
  }

  // -- notifications ---------------------------------------------------------------

  _notified(conn, method, body) {
    if (conn !== this._conn) {
      return;
    }
    let detail;
    try {
      switch (method) {
        case "message":
          this._message(conn, convertEntry(body));
          return;
        case "kicked":
          detail = { reason: str(body.reason) || "KICK_REASON_UNSPECIFIED", message: str(body.message) };
          this._emit("kicked", detail);
          this._giveUp(new IMError("KICKED", `${detail.reason} ${detail.message}`.trim()));
          return;
        case "typing":
          detail = { uid: str(body.uid), active: body.active === true, groupId: str(body.groupId) };
          break;
        case "notice": {
          const bytes = base64ToBytes(str(body.body));
          const contentType = str(body.contentType);
          detail = {
            body: bytes,
            contentType,
            text: isText(contentType) ? decodeText(bytes) : undefined,
            serverTimeMs: u64(body.serverTimeMs),
          };
          break;
        }
        default:
          console.debug("imserver: ignoring the notification", method);
          return;
      }
    } catch (e) {
      console.warn(`imserver: ignoring a ${method} notification that does not parse:`, e.message);
      return;
    }
    this._emit(method, detail);
  }

  _message(conn, entry) {
    if (entry.seq <= this.lastSeq) {
      // Seen before: ack again (cumulative) so the window moves.
      if (this.autoAck && conn.authenticated) {
        conn.processed(entry.seq);
      }
      return;
    }
    this.lastSeq = entry.seq;
    const message = entry.message;
    if (this.noEcho && entry.outgoing && (this._ownSeqs.has(entry.seq) || this._pending.has(message.clientMsgId))) {
      // One of our own sends: the application has it as a "sent" event.
      this._forgetOwn();
    } else {
      this._emit("message", entry);
    }
    if (this.autoAck && conn.authenticated && !conn.closed) {
      conn.processed(entry.seq);
    }
  }

  /** With noEcho, take a send's answer as its entry when the server says so. */
  _answered(conn, response) {
    if (!this.noEcho || response.seq <= this.lastSeq) {
      return;
    }
    if (response.echoSkipped) {
      // Every entry before it came first on this connection: the answer
      // is the entry, in its place (and acked like one).
      this.lastSeq = response.seq;
      this._forgetOwn();
      if (this.autoAck && conn === this._conn && conn.authenticated && !conn.closed) {
        conn.processed(response.seq);
      }
    } else {
      this._ownSeqs.add(response.seq);
    }
  }

  _forgetOwn() {
    for (const seq of this._ownSeqs) {
      if (seq <= this.lastSeq) {
        this._ownSeqs.delete(seq);
      }
    }
  }

  // -- sending -------------------------------------------------------------------

  /**
   * Send a message to `to`, or to the group `groupId` (exactly one of the
   * two); retried with the same clientMsgId until the server answers, over
   * reconnects (and over reloads, with `storage`).
   *
   * @param {object} message
   * @param {string} [message.to] the recipient's uid
   * @param {string} [message.groupId] or the group
   * @param {string} [message.text] the text (sent as UTF-8; contentType defaults to "text/plain")
   * @param {Uint8Array} [message.body] or the bytes
   * @param {string} [message.contentType]
   * @param {string} [message.clientMsgId] the idempotency key (default: a new UUID)
   * @returns {Promise<{messageId: number, serverTimeMs: number, seq: number, duplicate: boolean}>}
   *   the SendResponse once the message is stored; rejects with an IMError
   *   if the server refuses the message itself (BAD_REQUEST,
   *   MESSAGE_TOO_LARGE, UNKNOWN_METHOD, NOT_MEMBER, REJECTED), or TIMEOUT if it is
   *   not answered within maxSendAge.
   */
  send({ to = "", groupId = "", text, body, contentType, clientMsgId } = {}) {
    let bytes = body;
    if (text !== undefined) {
      bytes = encodeText(String(text));
      if (contentType === undefined) {
        contentType = "text/plain";
      }
    }
    if (!(bytes instanceof Uint8Array)) {
      bytes = new Uint8Array(0);
    }
    clientMsgId = clientMsgId || newClientMsgId();
    if (this._pending.has(clientMsgId)) {
      return this._pending.get(clientMsgId).promise;
    }
    const request = { clientMsgId, body: bytesToBase64(bytes), contentType: contentType || "" };
    if (to) {
      request.to = to;
    }
    if (groupId) {
      request.groupId = groupId;
    }
    const pending = this._addPending(request, Date.now());
    this._savePending();
    if (this.connected) {
      this._transmit(clientMsgId);
    }
    return pending.promise;
  }

  _addPending(request, createdMs) {
    const pending = { request, createdMs, retry: null, inflight: false, expiry: null };
    pending.promise = new Promise((resolve, reject) => {
      pending.resolve = resolve;
      pending.reject = reject;
    });
    // Restored sends have no caller: do not report their failure as unhandled.
    pending.promise.catch(() => {});
    const clientMsgId = request.clientMsgId;
    pending.expiry = setTimeout(() => {
      this._finish(clientMsgId, new IMError("TIMEOUT", `message ${clientMsgId} not answered within ${this.maxSendAge} ms`));
    }, Math.max(0, createdMs + this.maxSendAge - Date.now()));
    this._pending.set(clientMsgId, pending);
    return pending;
  }

  _transmit(clientMsgId) {
    const pending = this._pending.get(clientMsgId);
    const conn = this._conn;
    if (pending === undefined || pending.inflight || !this.connected) {
      return;
    }
    clearTimeout(pending.retry);
    pending.retry = null;
    pending.inflight = true;
    conn.call("send", pending.request, (error, body) => {
      pending.inflight = false;
      if (!error) {
        const response = convertSendResponse(body);
        this._answered(conn, response);
        this._finish(clientMsgId, null, response);
      } else if (FINAL_SEND_ERRORS.has(error.code)) {
        this._finish(clientMsgId, error);
      } else if (conn === this._conn && !conn.closed && this._pending.get(clientMsgId) === pending) {
        // UNAVAILABLE, INTERNAL, RATE_LIMITED or no answer yet: try again
        // shortly on this connection; the clientMsgId makes it safe.
        pending.retry = setTimeout(() => {
          pending.retry = null;
          if (conn === this._conn) {
            this._transmit(clientMsgId);
          }
        }, SEND_RETRY_DELAY);
      }
      // Connection gone: sent again after the next auth.
    });
  }

  _finish(clientMsgId, error, response) {
    const pending = this._pending.get(clientMsgId);
    if (pending === undefined) {
      return;
    }
    this._pending.delete(clientMsgId);
    clearTimeout(pending.retry);
    clearTimeout(pending.expiry);
    this._savePending();
    if (error) {
      pending.reject(error);
      this._emit("sendfailed", { clientMsgId, error });
    } else {
      pending.resolve(response);
      this._emit("sent", { clientMsgId, response });
    }
  }

  /**
   * The sends not answered yet, in the order they were sent.
   * @returns {Array<{clientMsgId: string, to: string, groupId: string, body: Uint8Array,
   *   contentType: string, text: string|undefined, createdMs: number}>}
   */
  pendingSends() {
    return [...this._pending.values()].map(({ request, createdMs }) => {
      const body = base64ToBytes(request.body);
      const contentType = request.contentType || "";
      return {
        clientMsgId: request.clientMsgId,
        to: request.to || "",
        groupId: request.groupId || "",
        body,
        contentType,
        text: isText(contentType) ? decodeText(body) : undefined,
        createdMs,
      };
    });
  }

  _savePending() {
    if (!this._storage) {
      return;
    }
    try {
      if (this._pending.size === 0) {
        this._storage.removeItem(this._storageKey);
      } else {
        const items = [...this._pending.values()].map(({ request, createdMs }) => ({ ...request, createdMs }));
        this._storage.setItem(this._storageKey, JSON.stringify(items));
      }
    } catch (e) {
      console.warn("imserver: could not save the pending sends:", e.message);
    }
  }

  _restorePending() {
    if (!this._storage) {
      return;
    }
    let items;
    try {
      items = JSON.parse(this._storage.getItem(this._storageKey) || "[]");
    } catch (e) {
      items = [];
    }
    if (!Array.isArray(items)) {
      return;
    }
    for (const item of items) {
      if (!item || typeof item.clientMsgId !== "string" || !item.clientMsgId || typeof item.body !== "string") {
        continue;
      }
      const request = { clientMsgId: item.clientMsgId, body: item.body, contentType: str(item.contentType) };
      if (item.to) {
        request.to = String(item.to);
      }
      if (item.groupId) {
        request.groupId = String(item.groupId);
      }
      if (!this._pending.has(request.clientMsgId)) {
        this._addPending(request, Number(item.createdMs) || Date.now());
      }
    }
  }

  // -- other requests ------------------------------------------------------------------

  _call(method, body) {
    const conn = this._conn;
    if (!this.connected) {
      return Promise.reject(new IMError("DISCONNECTED", "not connected"));
    }
    return conn.request(method, body);
  }

  /**
   * Acknowledge every inbox entry up to `seq` (default: lastSeq) on the
   * current connection.  Needed only with autoAck false.  Never ack a seq
   * that was not handed to you.
   * @param {number} [seq]
   * @returns {boolean} whether it was sent (false while not connected)
   */
  ack(seq = this.lastSeq) {
    return this.connected && seq > 0 ? this._conn.ack(seq) : false;
  }

  /**
   * Tell `to` (or, with `groupId`, the other members of the group) that
   * this user is typing (active) or stopped.  Best effort: never queued,
   * limited by the server (docs/protocol.md section 7.4).
   * @param {string} to
   * @param {boolean} [active]
   * @param {string} [groupId]
   * @returns {boolean} whether it was sent (false while not connected)
   */
  typing(to, active = true, groupId = "") {
    if (!this.connected) {
      return false;
    }
    const body = { active: Boolean(active) };
    if (groupId) {
      body.groupId = groupId;
    } else {
      body.uid = to;
    }
    return this._conn.notify("typing", body);
  }

  /**
   * @returns {Promise<{serverTimeMs: number}>}
   */
  async ping() {
    const body = await this._call("ping", {});
    return { serverTimeMs: u64(body.serverTimeMs) };
  }

  /**
   * Read a page of the inbox (a plain read: it does not change what is pushed).
   * @param {number} [afterSeq]
   * @param {number} [limit] 0: the server's page size
   * @returns {Promise<{entries: InboxEntry[], headSeq: number}>}
   */
  async sync(afterSeq = 0, limit = 0) {
    const body = await this._call("sync", { afterSeq: String(afterSeq), limit });
    return { entries: (body.entries || []).map(convertEntry), headSeq: u64(body.headSeq) };
  }

  /**
   * Every group this user is a member of (all pages).
   * @returns {Promise<Array<{groupId: string, name: string, role: string, memberCount: number, createdMs: number}>>}
   */
  async groups() {
    const groups = [];
    let after = "";
    for (;;) {
      const body = await this._call("groups", after ? { afterGroupId: after } : {});
      const page = (body.groups || []).map(convertGroup);
      groups.push(...page);
      if (body.more !== true || page.length === 0) {
        return groups;
      }
      after = page[page.length - 1].groupId;
    }
  }

  /**
   * Every member of a group this user is in (all pages); rejects with
   * NOT_MEMBER otherwise.
   * @param {string} groupId
   * @returns {Promise<Array<{uid: string, role: string, joinedMs: number}>>}
   */
  async members(groupId) {
    const members = [];
    let after = "";
    for (;;) {
      const request = { groupId };
      if (after) {
        request.afterUid = after;
      }
      const body = await this._call("members", request);
      const page = (body.members || []).map(convertMember);
      members.push(...page);
      if (body.more !== true || page.length === 0) {
        return members;
      }
      after = page[page.length - 1].uid;
    }
  }

  /**
   * Leave a group.
   * @param {string} groupId
   * @returns {Promise<void>}
   */
  async leave(groupId) {
    await this._call("leave", { groupId });
  }
}
