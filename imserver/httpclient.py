# -*- test-case-name: tests.test_beforesend,tests.test_webhooks -*-
"""
What the gate's HTTP clients to the app backend share (the before-send
check, L{imserver.beforesend}; the webhooks, L{imserver.webhooks.http}):
checking a configured URL, the trust root of an C{https://} one, and a
request body held in memory.
"""

from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


def checkURL(text: str) -> bytes:
    """
    Check the URL of an app backend endpoint: C{http://} or C{https://},
    with a host, no user name or password (none is sent: the gate
    authenticates itself otherwise), no fragment, no white space, ASCII.

    @return: the URL as bytes, for L{twisted.web.client.Agent.request}.
    @raise ValueError: saying what is wrong (never repeating a password).
    """
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError("not a URL: {}".format(e)) from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("the scheme must be http or https")
    if not parts.hostname:
        raise ValueError("it has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("user names and passwords in the URL are not sent")
    if parts.fragment:
        raise ValueError("it has a fragment")
    if port == 0:
        raise ValueError("port 0")
    if any(c in text for c in " \t\r\n"):
        raise ValueError("it holds white space")
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("it is not ASCII (percent-encode it, IDNA for the host)") from None


def trustRootFor(caFile: str | None) -> Any:
    """
    The trust root for an C{https://} URL: the certificates of C{caFile}
    (PEM: one, or a bundle), or the platform's.

    @raise OSError: if C{caFile} cannot be read.
    @raise ValueError: if it holds no PEM certificate.
    """
    from twisted.internet import ssl

    if caFile is None:
        return ssl.platformTrust()
    from twisted.python.filepath import FilePath

    data = FilePath(caFile).getContent()
    pems = [
        b"-----BEGIN CERTIFICATE-----" + part
        for part in data.split(b"-----BEGIN CERTIFICATE-----")[1:]
    ]
    if not pems:
        raise ValueError("no PEM certificate in it")
    try:
        certificates = [ssl.Certificate.loadPEM(pem) for pem in pems]
    except Exception as e:
        raise ValueError("not a PEM certificate ({})".format(e))
    if len(certificates) == 1:
        return certificates[0]
    return ssl.trustRootFromCertificates(certificates)


@implementer(IBodyProducer)
class BytesBody:
    """
    A request body already in memory, written at once.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> "Deferred[None]":
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
