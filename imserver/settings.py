# -*- test-case-name: tests.test_tap -*-
"""
Every limit, interval and size the server enforces, in one place.

Each field is a named setting with a default; L{imserver.tap.Options} turns
every field into a command-line option (``max_frame_length`` becomes
``--max-frame-length``), so ``twistd im --help`` lists them all.
docs/protocol.md and docs/configuration.md give the same table.
"""

from dataclasses import dataclass, field, fields, replace

#: Times sent to clients in milliseconds must fit the uint32 wire fields.
_MAX_SECONDS = 0xFFFFFFFF // 1000


def _setting(default, help, minimum=None, maximum=None):
    return field(
        default=default,
        metadata={"help": help, "minimum": minimum, "maximum": maximum},
    )


@dataclass(frozen=True)
class Settings:
    """
    Server settings.  Times are in seconds, sizes in bytes.
    """

    max_frame_length: int = _setting(
        64 * 1024,
        "Largest frame (bytes, length prefix excluded) after auth.",
        64,
        0xFFFFFFFF,
    )
    preauth_max_frame_length: int = _setting(
        4 * 1024, "Largest frame accepted before auth has succeeded.", 64
    )
    auth_timeout: float = _setting(10.0, "Seconds a new connection has to authenticate.", 0.001)
    heartbeat_interval: float = _setting(
        30.0,
        "Heartbeat interval told to clients (upper bound, before jitter).",
        0.01,
        _MAX_SECONDS,
    )
    heartbeat_jitter: float = _setting(
        0.2,
        "Fraction of the interval removed at random per connection (0..0.9), so "
        "clients do not beat in step.",
        0.0,
        0.9,
    )
    idle_timeout: float = _setting(
        90.0,
        "Close a connection heard nothing from for this long (about 3 intervals).",
        0.01,
        _MAX_SECONDS,
    )
    sweep_interval: float = _setting(
        1.0,
        "How often the idle sweep runs; an idle connection is closed at most "
        "this much after its idle timeout.",
        0.001,
    )
    max_devices: int = _setting(10, "Concurrent sessions (devices) allowed per user.", 1)
    request_timeout: float = _setting(
        30.0, "Seconds the server waits for a response to its own requests.", 0.001
    )
    shutdown_grace: float = _setting(
        5.0,
        "Seconds connections get to close cleanly on shutdown before they are aborted.",
        0.0,
    )
    close_timeout: float = _setting(
        2.0,
        "Seconds a connection the gate closes gets to finish (pending writes, "
        "the TLS close) before it is aborted.",
        0.001,
    )
    listen_backlog: int = _setting(
        4096, "Listen queue length for endpoints that do not set backlog=.", 1
    )
    max_connections: int = _setting(
        19_000,
        "Connections one gate process holds; more are closed at accept, before TLS "
        "(keep it below the process's open-file limit).",
        1,
    )
    max_connections_per_ip: int = _setting(
        1000,
        "Connections from one peer address (carrier NATs put many phones behind "
        "one); more are closed at accept. Not applied behind haproxy: listeners.",
        1,
    )
    accept_rate: float = _setting(
        2000.0,
        "New connections accepted per second (token bucket, burst of one "
        "second's worth); more are closed at accept. Bounds reconnect storms.",
        0.01,
    )
    request_rate: float = _setting(
        50.0,
        "Requests per second one connection may send (token bucket; notifies such "
        "as acks are not counted); more are answered RATE_LIMITED.",
        0.01,
    )
    request_burst: int = _setting(
        100, "Requests one connection may send at once before --request-rate applies.", 1
    )
    rate_limit_close: int = _setting(
        50,
        "Requests refused RATE_LIMITED in a row after which the connection is closed.",
        1,
    )
    auth_failure_rate: float = _setting(
        0.2,
        "Failed auths per second allowed per peer address and per uid in the long "
        "run; beyond it auths are refused RATE_LIMITED without checking the token.",
        0.001,
    )
    auth_failure_burst: int = _setting(
        10, "Failed auths allowed at once per peer address and per uid.", 1
    )
    max_token_length: int = _setting(
        2048,
        "Longest token accepted, in characters (an RS256 JWT is some 600 to 900); a "
        "longer one is refused AUTH_FAILED unread. The auth request holding it must "
        "also fit in --preauth-max-frame-length.",
        64,
        65536,
    )
    jwt_leeway: float = _setting(
        30.0,
        "Seconds of clock skew allowed when checking a JWT's exp, nbf and iat.",
        0.0,
        3600.0,
    )
    jwks_refresh_interval: float = _setting(
        300.0,
        "Seconds between reads of the JWT public keys (--jwks, --jwt-public-key).",
        1.0,
    )
    jwks_min_refresh_interval: float = _setting(
        30.0,
        "Least seconds between two key reads triggered by JWTs naming an unknown key (kid).",
        0.0,
    )
    jwks_fetch_timeout: float = _setting(
        5.0,
        "Seconds a fetch of the --jwks URL may take; an auth waiting for a key "
        "refresh waits at most this long.",
        0.001,
    )
    write_buffer_high: int = _setting(
        256 * 1024,
        "Bytes waiting to be written to a connection above which pushes to it pause "
        "(they stay in the inbox) and its requests are not read; both resume once "
        "the buffer is written.",
        4096,
    )
    slow_consumer_grace: float = _setting(
        30.0,
        "Seconds a connection may stay paused by a full write buffer before it is "
        "closed with SLOW_CONSUMER.",
        0.01,
    )
    max_message_body: int = _setting(
        32 * 1024,
        "Largest message body accepted by send, in bytes (at most --max-frame-length minus 1024).",
        1,
    )
    max_unacked: int = _setting(
        64,
        "Pushed messages a connection may have unacknowledged; the rest waits in the inbox.",
        1,
        1_000_000,
    )
    max_group_size: int = _setting(
        2000,
        "Most members a group may have (each group message is written to every member's inbox).",
        1,
        1_000_000,
    )
    sync_page_size: int = _setting(
        100,
        "Items per page: inbox fetches, replay, sync, groups and members responses.",
        1,
    )
    dedup_window: float = _setting(
        24 * 3600.0,
        "Seconds a client_msg_id is remembered: a retry within it stores nothing.",
        1.0,
    )
    redis_wait_replicas: int = _setting(
        0,
        "Cluster mode: replicas (Redis WAIT) that must have a message before its send is "
        "answered (0: answer once the primary has it).",
        0,
        16,
    )
    redis_wait_timeout: float = _setting(
        1.0,
        "Cluster mode: seconds to wait for --redis-wait-replicas; fewer in time: UNAVAILABLE.",
        0.001,
        60.0,
    )
    store_commit_delay: float = _setting(
        0.001,
        "SQLite store: least seconds between two commits while writes keep "
        "coming, so steady sends share one (0: commit as soon as one waits).",
        0.0,
        0.1,
    )
    store_wal_autocheckpoint: int = _setting(
        10000,
        "SQLite store: WAL pages (4 KiB) after which a commit copies the WAL "
        "into the database file (SQLite's wal_autocheckpoint).",
        100,
        1_000_000,
    )
    before_send_timeout: float = _setting(
        2.0,
        "Seconds a send waits for the --before-send check's answer (queue "
        "included); then --before-send-failure decides.",
        0.001,
        600.0,
    )
    before_send_concurrency: int = _setting(
        64,
        "Before-send checks in flight at once (HTTP connections to the "
        "--before-send URL); more wait in the queue.",
        1,
        10_000,
    )
    before_send_queue: int = _setting(
        1024,
        "Sends waiting for a before-send check slot; a send beyond it is answered RATE_LIMITED.",
        0,
    )
    retention_age: float = _setting(
        30 * 24 * 3600.0,
        "Seconds inbox entries are kept; older ones are removed, acked or not.",
        60.0,
    )
    retention_count: int = _setting(
        10000,
        "Entries kept per inbox; beyond it the oldest ones every device seen "
        "within --retention-age acknowledged go (others younger than "
        "--retention-age never do).",
        1,
    )
    retention_interval: float = _setting(
        600.0, "Seconds between retention passes over the store.", 0.01
    )
    cursor_flush_interval: float = _setting(
        1.0,
        "Seconds between writes of acknowledged positions (one write for all "
        "devices); the client's last_seq at auth, not this, decides resumption.",
        0.001,
    )
    typing_rate: float = _setting(
        2.0, "Typing signals per second a connection may send; more are dropped.", 0.01
    )
    tls_ticket_rotation: float = _setting(
        43200.0,
        "Seconds between rotations of the TLS session ticket keys of the ssl: "
        "listeners (a ticket resumes a session until the next rotation or reload).",
        60.0,
    )
    web_request_timeout: float = _setting(
        10.0,
        "Seconds an HTTP connection of the --web listener lives: until its "
        "WebSocket upgrade is complete, or for page requests its whole life.",
        0.001,
    )
    web_max_request_size: int = _setting(
        8192,
        "Largest request line plus headers of a request to the --web listener (bytes).",
        1024,
    )
    api_max_body: int = _setting(
        1024 * 1024,
        "Largest HTTP API request body, in bytes; a larger one is refused with "
        "413 before it is read.",
        1,
    )
    webhook_timeout: float = _setting(
        10.0,
        "Seconds a webhook request may take (connecting, sending, the answer); "
        "then it is cancelled and retried.",
        0.001,
    )
    webhook_retry_initial: float = _setting(
        1.0,
        "Upper bound of the first webhook retry delay, in seconds; it doubles at "
        "every failed attempt of the same event (full jitter).",
        0.001,
    )
    webhook_retry_max: float = _setting(
        300.0, "Most seconds between two webhook attempts of one event.", 0.001
    )
    webhook_retention: float = _setting(
        3 * 86400.0,
        "Seconds an undelivered webhook event is kept; older ones are dropped "
        "(counted and logged).",
        60.0,
    )
    webhook_concurrency: int = _setting(
        16,
        "Webhook requests in flight at once (each for a different ordering key).",
        1,
        10_000,
    )
    webhook_batch: int = _setting(
        100, "Webhook events read from the outbox at once, and removed at once.", 1, 100_000
    )
    webhook_window: int = _setting(
        1000,
        "Webhook events the sender holds in memory at once (read ahead from the outbox).",
        1,
        1_000_000,
    )
    webhook_poll_interval: float = _setting(
        0.2, "Seconds between looks at the webhook outbox for new events.", 0.001
    )
    outbox_max_events: int = _setting(
        1_000_000,
        "Most webhook events kept undelivered; beyond it new events are not kept "
        "(counted and logged; what they report is stored all the same).",
        1,
    )
    presence_flap_window: float = _setting(
        5.0,
        "Seconds a user.offline webhook is held: a device back on this gate "
        "within it is reported neither offline nor online again (0: none held).",
        0.0,
        3600.0,
    )

    def __post_init__(self):
        for f in fields(self):
            minimum = f.metadata.get("minimum")
            maximum = f.metadata.get("maximum")
            value = getattr(self, f.name)
            if minimum is not None and value < minimum:
                raise ValueError(
                    "{} must be at least {}, not {}".format(optionName(f.name), minimum, value)
                )
            if maximum is not None and value > maximum:
                raise ValueError(
                    "{} must be at most {}, not {}".format(optionName(f.name), maximum, value)
                )
        if self.idle_timeout <= self.heartbeat_interval:
            raise ValueError("--idle-timeout must exceed --heartbeat-interval")
        if self.max_message_body + 1024 > self.max_frame_length:
            raise ValueError("--max-message-body must be at most --max-frame-length minus 1024")
        if self.dedup_window > self.retention_age:
            raise ValueError("--dedup-window must not exceed --retention-age")
        if self.preauth_max_frame_length > self.max_frame_length:
            raise ValueError("--preauth-max-frame-length must not exceed --max-frame-length")
        if self.webhook_retry_initial > self.webhook_retry_max:
            raise ValueError("--webhook-retry-initial must not exceed --webhook-retry-max")

    def replace(self, **changes):
        """
        Return a copy with C{changes} applied (and validated).
        """
        return replace(self, **changes)


def optionName(fieldName):
    """
    The command-line spelling of a settings field.
    """
    return "--" + fieldName.replace("_", "-")


def settingFields():
    """
    The settings fields, in declaration order.
    """
    return fields(Settings)
