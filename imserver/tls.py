# -*- test-case-name: tests.test_tls -*-
"""
TLS for the gate: the hardened server context, and a self-signed
certificate generated into the data directory for the embedded default.

The profile is Mozilla "intermediate" without its DHE suites: TLS 1.2 and
1.3 only, forward-secret AEAD suites only (ECDHE with AES-GCM or
ChaCha20-Poly1305), no compression, no renegotiation.
"""

import datetime
import hashlib
import ipaddress
import os
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from imserver.datadir import CERT_FILE_NAME, KEY_FILE_NAME

log = Logger()

#: TLS 1.2 suites allowed (TLS 1.3 suites are all AEAD and forward secret).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)

#: Validity of a generated self-signed certificate, in days: at most 398,
#: what browsers and TLS scanners (testssl) accept for a server certificate.
SELF_SIGNED_DAYS = 397
#: A generated certificate this close to expiry is replaced at start.
RENEW_BEFORE = datetime.timedelta(days=30)
#: Permissions of the generated certificate (public) and key (secret).
CERT_FILE_MODE = 0o644
KEY_FILE_MODE = 0o600


class HardenedCertificateOptions(ssl.CertificateOptions):
    """
    L{ssl.CertificateOptions} that also refuses renegotiation.
    """

    def _makeContext(self):
        ctx = super()._makeContext()
        ctx.set_options(SSL.OP_NO_RENEGOTIATION)
        return ctx


def serverOptions(certPEM, keyPEM, chainPEM=None):
    """
    The server TLS context factory.

    @param certPEM: the certificate, PEM L{bytes}, optionally followed by
        its intermediates (a "fullchain" file).
    @param keyPEM: its private key, PEM L{bytes}.
    @param chainPEM: more intermediate certificates, PEM L{bytes}, or
        L{None}.
    @rtype: L{ssl.CertificateOptions}
    @raise ValueError: if a file holds no certificate or the key does not
        match.
    """
    blocks = _PEM_CERTIFICATE.findall(certPEM)
    if not blocks:
        raise ValueError("the certificate file holds no PEM certificate")
    if chainPEM:
        extra = _PEM_CERTIFICATE.findall(chainPEM)
        if not extra:
            raise ValueError("the certificate chain holds no PEM certificate")
        blocks += extra
    try:
        cert = ssl.PrivateCertificate.loadPEM(blocks[0] + b"\n" + keyPEM)
        chain = [ssl.Certificate.loadPEM(block).original for block in blocks[1:]]
        return HardenedCertificateOptions(
            privateKey=cert.privateKey.original,
            certificate=cert.original,
            extraCertChain=chain or None,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
            # Session resumption with stateless tickets (RFC 5077, and TLS
            # 1.3's PSK): a client reconnecting to this process pays an
            # abbreviated handshake.  The ticket keys are OpenSSL's, made
            # with each context: a reload or a rotation
            # (ReloadableServerOptions.rotate) replaces them.
            enableSessionTickets=True,
        )
    except (SSL.Error, crypto.Error, VerifyError) as e:
        raise ValueError("cannot load the certificate or key: {}".format(e))


def fingerprint(certPEM):
    """
    The SHA-256 fingerprint of a PEM certificate, as colon-separated hex.
    """
    der = x509.load_pem_x509_certificate(certPEM).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def makeSelfSigned(
    hostnames=("localhost",), addresses=("127.0.0.1", "::1"), days=SELF_SIGNED_DAYS, now=None
):
    """
    Make a self-signed ECDSA P-256 certificate for C{hostnames} and
    C{addresses}.

    @return: C{(certPEM, keyPEM)}
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    san = [x509.DNSName(h) for h in hostnames] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in addresses
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def writeFile(path, content, mode):
    """
    Replace the file at C{path} with C{content}, with permissions exactly
    C{mode}: written to a new sibling created with C{mode} (set again with
    C{fchmod}, which the umask does not touch), flushed to disk, then
    renamed over C{path}.  Readers see the old file or the whole new one.

    @type path: L{twisted.python.filepath.FilePath}
    @type content: L{bytes}
    @param mode: the permission bits, such as C{0o600}.
    """
    temporary = path.temporarySibling(".new")
    fd = os.open(temporary.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary.path, path.path)
    except BaseException:
        if os.path.exists(temporary.path):
            os.unlink(temporary.path)
        raise


def ensureSelfSigned(dataDir, now=None):
    """
    Return the paths of the data directory's self-signed certificate and
    key, generating them first if absent, or if the one there expires
    within L{RENEW_BEFORE} (certificate mode 0644, key mode 0600, whatever
    the umask and the modes of the files replaced).  Logs the path and the
    SHA-256 fingerprint, so clients can pin or trust it.

    @type dataDir: L{twisted.python.filepath.FilePath}
    @param now: the time (UTC L{datetime.datetime}); for tests.
    @return: C{(certPath, keyPath)}, L{FilePath}s.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    certPath = dataDir.child(CERT_FILE_NAME)
    keyPath = dataDir.child(KEY_FILE_NAME)
    exists = certPath.exists() and keyPath.exists()
    if exists:
        expires = x509.load_pem_x509_certificate(certPath.getContent()).not_valid_after_utc
        if expires - now < RENEW_BEFORE:
            log.warn(
                "the self-signed TLS certificate {path} expires {expires}: replacing it"
                " (clients that pinned it must trust the new one)",
                path=certPath.path,
                expires=expires.isoformat(),
            )
            exists = False
    if not exists:
        if not dataDir.exists():
            dataDir.makedirs()
        certPEM, keyPEM = makeSelfSigned(now=now)
        writeFile(keyPath, keyPEM, KEY_FILE_MODE)
        writeFile(certPath, certPEM, CERT_FILE_MODE)
        log.info("generated a self-signed TLS certificate {path}", path=certPath.path)
    log.info(
        "TLS certificate {path} SHA-256 {fingerprint}",
        path=certPath.path,
        fingerprint=fingerprint(certPath.getContent()),
    )
    return certPath, keyPath


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerOptions:
    """
    The server TLS options of certificate files that can be read again
    while the gate runs (on SIGHUP): new connections use the new
    certificate, open ones keep theirs.

    @ivar current: the L{ssl.CertificateOptions} in use.
    """

    def __init__(self, certPath, keyPath, chainPath=None):
        self.certPath = certPath
        self.keyPath = keyPath
        self.chainPath = chainPath
        self.current = self._load()

    def _load(self):
        return serverOptions(
            self.certPath.getContent(),
            self.keyPath.getContent(),
            self.chainPath.getContent() if self.chainPath is not None else None,
        )

    def reload(self):
        """
        Read the files again.  If they cannot be used, keep the current
        certificate and log why.

        @return: whether the new files are in use.
        """
        try:
            self.current = self._load()
        except (OSError, ValueError) as e:
            log.error(
                "TLS certificate {path} not reloaded: {why}", path=self.certPath.path, why=str(e)
            )
            return False
        log.info(
            "TLS certificate {path} reloaded, SHA-256 {fingerprint}",
            path=self.certPath.path,
            fingerprint=fingerprint(self.certPath.getContent()),
        )
        return True

    def rotate(self):
        """
        Replace the session ticket keys: a new context from the same files
        (they are read again).  Tickets issued before no longer resume a
        session; their clients make one full handshake.

        @return: whether the keys were replaced.
        """
        try:
            self.current = self._load()
        except (OSError, ValueError) as e:
            log.error(
                "TLS session ticket keys of {path} not rotated: {why}",
                path=self.certPath.path,
                why=str(e),
            )
            return False
        return True

    def serverConnectionForTLS(self, tlsProtocol):
        return self.current.serverConnectionForTLS(tlsProtocol)
