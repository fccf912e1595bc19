# -*- test-case-name: tests.test_webhooks -*-
"""
The signature of a webhook request, and the webhook secret.

Every request carries C{X-IM-Timestamp: <Unix seconds at the attempt>} and
C{X-IM-Signature: v1=<hex>}, where C{<hex>} is the lower-case hexadecimal
HMAC-SHA256, keyed with the webhook secret, of the ASCII timestamp, a full
stop, and the exact body bytes::

    v1=hex(HMAC-SHA256(secret, timestamp + "." + body))

The secret is the content of the webhook secret file with the surrounding
whitespace stripped, as bytes (the 64 hex characters of a generated one are
the key as they are, not decoded).  A receiver recomputes the signature
over the raw body, compares it in constant time, and refuses a timestamp
more than L{REPLAY_WINDOW} seconds from its own clock.  A retry is signed
again with a new timestamp.  docs/api.md, "Webhooks", has a test vector.
"""

import hashlib
import hmac

from twisted.logger import Logger
from twisted.python.filepath import FilePath

from imserver.auth import createSecretFile, loadSecret

log = Logger()

#: The signature scheme: the prefix of C{X-IM-Signature}.
SIGNATURE_VERSION = "v1"
#: Seconds a receiver should accept between C{X-IM-Timestamp} and its own
#: clock, either way.
REPLAY_WINDOW = 300
#: The webhook secret's file in the data directory.
WEBHOOK_SECRET_FILE_NAME = "webhook-secret"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """
    The C{X-IM-Signature} value of C{body} sent at C{timestamp}.

    @param secret: the webhook secret.
    @param timestamp: whole Unix seconds, as sent in C{X-IM-Timestamp}.
    """
    mac = hmac.new(secret, str(int(timestamp)).encode("ascii") + b"." + body, hashlib.sha256)
    return "{}={}".format(SIGNATURE_VERSION, mac.hexdigest())


def verify(
    secret: bytes,
    timestamp: str | bytes,
    signature: str | bytes,
    body: bytes,
    now: float,
    window: float = REPLAY_WINDOW,
) -> bool:
    """
    What a receiver does: is C{signature} the signature of C{body} at
    C{timestamp}, and C{timestamp} within C{window} seconds of C{now}?

    @param timestamp: the C{X-IM-Timestamp} header.
    @param signature: the C{X-IM-Signature} header.
    """
    if isinstance(timestamp, bytes):
        timestamp = timestamp.decode("ascii", "replace")
    if isinstance(signature, bytes):
        signature = signature.decode("ascii", "replace")
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        return False
    if abs(now - int(timestamp)) > window:
        return False
    expected = sign(secret, int(timestamp), body)
    return hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "replace"))


def loadWebhookSecret(dataDir: FilePath, secretFile: str | None = None) -> bytes:
    """
    The webhook secret: the content of C{secretFile} if given (which must
    exist), else of C{<dataDir>/webhook-secret}, generated if absent (32
    random bytes as hex, mode 0600), like the token secret.

    @raise ValueError: if it cannot be read or is shorter than 16 bytes.
    @raise OSError: if it cannot be created.
    """
    if secretFile is None:
        path = dataDir.child(WEBHOOK_SECRET_FILE_NAME)
        if not path.exists():
            createSecretFile(path)
            log.info("generated a new webhook secret in {path}", path=path.path)
    else:
        path = FilePath(secretFile)
    return loadSecret(secretFile=path, environ={})
