"""
Tests for L{imserver.tls} and L{imserver.endpoints}.
"""

import datetime
import os
import stat

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from imserver import tls
from imserver.datadir import CERT_FILE_NAME, KEY_FILE_NAME
from imserver.endpoints import listenEndpoint, splitDescription


def _mode(path):
    """
    The permission bits of the file at C{path} (a L{FilePath}).
    """
    return stat.S_IMODE(os.stat(path.path).st_mode)


class ContextTests(SynchronousTestCase):
    """
    The server TLS context.
    """

    def setUp(self):
        cert, key = tls.makeSelfSigned()
        self.options = tls.serverOptions(cert, key)
        self.context = self.options.getContext()

    def test_ciphers(self):
        """
        Only ECDHE suites with AES-GCM or ChaCha20 are offered for TLS 1.2
        (TLS 1.3 suites are all AEAD).
        """
        connection = SSL.Connection(self.context, None)
        names = connection.get_cipher_list()
        tls12 = [n for n in names if not n.startswith("TLS_")]
        self.assertTrue(tls12)
        for name in tls12:
            self.assertTrue(name.startswith("ECDHE-"), name)
            self.assertTrue("GCM" in name or "CHACHA20" in name, name)

    def test_minimumVersion(self):
        """
        TLS 1.0 and 1.1 are disabled; compression and renegotiation too.
        """
        options = self.context.set_options(0)  # returns the current options
        for flag in (
            SSL.OP_NO_TLSv1,
            SSL.OP_NO_TLSv1_1,
            SSL.OP_NO_COMPRESSION,
            SSL.OP_NO_RENEGOTIATION,
        ):
            self.assertTrue(options & flag, flag)


class SelfSignedTests(SynchronousTestCase):
    """
    L{tls.ensureSelfSigned}.
    """

    def test_generatedOnce(self):
        """
        The certificate and key are generated once (key mode 0600) and
        reused.
        """
        dataDir = FilePath(self.mktemp())
        cert, key = tls.ensureSelfSigned(dataDir)
        self.assertEqual(key.getPermissions().shorthand(), "rw-------")
        content = cert.getContent()
        cert2, key2 = tls.ensureSelfSigned(dataDir)
        self.assertEqual(cert2.getContent(), content)

    def test_modes(self):
        """
        The certificate is written with mode 0644 and the key with 0600,
        whatever the umask.
        """
        for umask in (0o000, 0o022, 0o077):
            old = os.umask(umask)
            try:
                cert, key = tls.ensureSelfSigned(FilePath(self.mktemp()))
            finally:
                os.umask(old)
            self.assertEqual((_mode(cert), _mode(key)), (0o644, 0o600), oct(umask))

    def test_renewedModes(self):
        """
        A renewed certificate and key get modes 0644 and 0600 even where the
        files they replace had others; no temporary file is left behind.
        """
        dataDir = FilePath(self.mktemp())
        start = datetime.datetime.now(datetime.timezone.utc)
        cert, key = tls.ensureSelfSigned(dataDir, now=start)
        cert.chmod(0o755)
        key.chmod(0o644)
        tls.ensureSelfSigned(dataDir, now=start + datetime.timedelta(days=370))
        self.assertEqual((_mode(cert), _mode(key)), (0o644, 0o600))
        self.assertEqual(sorted(dataDir.listdir()), [CERT_FILE_NAME, KEY_FILE_NAME])

    def test_writeFileFails(self):
        """
        L{tls.writeFile} removes its temporary file when writing fails, and
        leaves the file it was to replace as it was.
        """
        dataDir = FilePath(self.mktemp())
        dataDir.makedirs()
        path = dataDir.child("f")
        path.setContent(b"old")
        self.assertRaises(TypeError, tls.writeFile, path, "not bytes", 0o600)
        self.assertEqual(dataDir.listdir(), ["f"])
        self.assertEqual(path.getContent(), b"old")

    def test_validity(self):
        """
        A generated certificate is valid for at most 398 days (what TLS
        scanners accept).
        """
        cert, _ = tls.makeSelfSigned()
        parsed = x509.load_pem_x509_certificate(cert)
        days = (parsed.not_valid_after_utc - parsed.not_valid_before_utc).days
        self.assertLessEqual(days, 398)

    def test_renewedBeforeExpiry(self):
        """
        A generated certificate that expires within 30 days is replaced at
        start; one that does not is kept.
        """
        dataDir = FilePath(self.mktemp())
        start = datetime.datetime.now(datetime.timezone.utc)
        cert, _ = tls.ensureSelfSigned(dataDir, now=start)
        first = cert.getContent()
        tls.ensureSelfSigned(dataDir, now=start + datetime.timedelta(days=300))
        self.assertEqual(cert.getContent(), first)
        tls.ensureSelfSigned(dataDir, now=start + datetime.timedelta(days=370))
        self.assertNotEqual(cert.getContent(), first)

    def test_reload(self):
        """
        L{tls.ReloadableServerOptions.reload} reads the files again; files
        that cannot be used leave the current certificate in place.
        """
        dataDir = FilePath(self.mktemp())
        certPath, keyPath = tls.ensureSelfSigned(dataDir)
        options = tls.ReloadableServerOptions(certPath, keyPath)
        before = options.current
        newCert, newKey = tls.makeSelfSigned(hostnames=("gate.example",))
        certPath.setContent(newCert)
        keyPath.setContent(newKey)
        self.assertTrue(options.reload())
        self.assertIsNot(options.current, before)
        current = options.current
        keyPath.setContent(b"not a key")
        self.assertFalse(options.reload())
        self.assertIs(options.current, current)

    def test_fingerprint(self):
        """
        The fingerprint is 32 colon-separated hex bytes.
        """
        cert, _ = tls.makeSelfSigned()
        parts = tls.fingerprint(cert).split(":")
        self.assertEqual(len(parts), 32)
        self.assertTrue(all(len(p) == 2 for p in parts))


class EndpointTests(SynchronousTestCase):
    """
    L{listenEndpoint} and L{splitDescription}.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        directory = FilePath(self.mktemp())
        self.certificate = tls.ensureSelfSigned(directory)

    def test_split(self):
        """
        Descriptions split on unescaped colons into positional and keyword
        arguments.
        """
        self.assertEqual(
            splitDescription(r"tcp6:7000:interface=\:\:1"),
            (["tcp6", "7000"], {"interface": "::1"}),
        )
        self.assertRaises(ValueError, splitDescription, "tcp:1\\")

    def test_tcpBacklog(self):
        """
        tcp: endpoints get the default backlog unless they set one.
        """
        endpoint = listenEndpoint(self.reactor, "tcp:0:interface=127.0.0.1", None, 4096)
        self.assertIsInstance(endpoint.endpoint, TCP4ServerEndpoint)
        endpoint.listen(object())
        self.assertEqual(self.reactor.tcpServers[0][2], 4096)
        listenEndpoint(self.reactor, "tcp:0:backlog=10", None, 4096).listen(object())
        self.assertEqual(self.reactor.tcpServers[1][2], 10)

    def test_sslDefaults(self):
        """
        ssl: endpoints use the given certificate, the hardened options and
        the default backlog.
        """
        endpoint = listenEndpoint(
            self.reactor, "ssl:7443:interface=127.0.0.1", self.certificate, 4096
        )
        self.assertIsInstance(endpoint.tlsOptions.current, tls.HardenedCertificateOptions)
        factory = Factory()
        endpoint.listen(factory)
        [(port, tlsFactory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, backlog, interface), (7443, 4096, "127.0.0.1"))
        self.assertIsInstance(tlsFactory, TLSMemoryBIOFactory)
        self.assertIs(tlsFactory.wrappedFactory, factory)

    def test_sslOwnCertificate(self):
        """
        ssl: endpoints may name their own certificate files.
        """
        cert, key = self.certificate
        endpoint = listenEndpoint(
            self.reactor,
            "ssl:port=1:certKey={}:privateKey={}".format(cert.path, key.path),
            None,
            4096,
        )
        endpoint.listen(Factory())
        self.assertEqual(self.reactor.tcpServers[0][0], 1)

    def test_sslErrors(self):
        """
        Unsupported keywords, a missing port or a missing certificate are
        errors.
        """
        for description in ["ssl:1:sslmethod=TLSv1_METHOD", "ssl:interface=x"]:
            self.assertRaises(
                ValueError, listenEndpoint, self.reactor, description, self.certificate, 4096
            )
        self.assertRaises(ValueError, listenEndpoint, self.reactor, "ssl:1", None, 4096)


class ChainTests(SynchronousTestCase):
    """
    Certificates with intermediates, and endpoint descriptions refused.
    """

    def test_fullChainFile(self):
        """
        Certificates after the first in the certificate file are sent as the
        chain, as are those of a separate chain file.
        """
        leaf, key = tls.makeSelfSigned()
        intermediate, _ = tls.makeSelfSigned(hostnames=("intermediate",))
        other, _ = tls.makeSelfSigned(hostnames=("other",))
        options = tls.serverOptions(leaf + intermediate, key)
        self.assertEqual(len(options.extraCertChain), 1)
        options = tls.serverOptions(leaf + intermediate, key, other)
        self.assertEqual(len(options.extraCertChain), 2)

    def test_badPEM(self):
        """
        A file with no certificate, or a key that does not belong, is a
        L{ValueError}.
        """
        leaf, key = tls.makeSelfSigned()
        _, otherKey = tls.makeSelfSigned()
        self.assertRaises(ValueError, tls.serverOptions, b"junk", key)
        self.assertRaises(ValueError, tls.serverOptions, leaf, otherKey)

    def test_nestedSSLRefused(self):
        """
        ssl: inside a wrapper endpoint would bypass the hardened profile, so
        it is refused.
        """
        self.assertRaises(
            ValueError, listenEndpoint, MemoryReactorClock(), "haproxy:ssl:443", None, 4096
        )

    def test_typeCaseInsensitive(self):
        """
        The endpoint type is matched case-insensitively, as Twisted does.
        """
        reactor = MemoryReactorClock()
        listenEndpoint(reactor, "TCP:0", None, 4096).listen(object())
        self.assertEqual(reactor.tcpServers[0][2], 4096)
