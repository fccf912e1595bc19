# -*- test-case-name: tests.test_testssl -*-
"""
The gate's TLS profile, checked by an outside scanner: C{testssl} (Debian
package C{testssl.sh}) against a live gate on loopback.  Any finding of
severity MEDIUM or higher fails the test, except the one that comes from the
test certificate's private CA not being trusted by the scanner.

The test certificate is issued by a throwaway CA with what a production
certificate has (server-auth usage, a CRL distribution point, a 90-day
validity), so that only its trust is left to excuse.  About 45 s; CI runs
it (C{$CI_REQUIRE_ALL}).
"""

import datetime
import ipaddress
import json

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from imserver import tap

from tests.support import killAtCleanup, requireExecutable, startServer, withoutSecretEnvironment

#: Finding ids excused: the private test CA is not in the scanner's trust store.
EXCUSED = frozenset(["cert_chain_of_trust"])

#: Severities that fail the test.
FAILING = frozenset(["MEDIUM", "HIGH", "CRITICAL"])


def issueTestCertificate(directory):
    """
    Write a CA-issued certificate for C{localhost}/127.0.0.1 (full chain)
    and its key into C{directory}.

    @return: C{(fullchainPath, keyPath)}
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=90)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imserver test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(caKey, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(caName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        [x509.UniformResourceIdentifier("http://127.0.0.1:9/test-ca.crl")],
                        None,
                        None,
                        None,
                    )
                ]
            ),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )
    chain = directory.child("fullchain.pem")
    chain.setContent(
        leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    )
    keyPath = directory.child("key.pem")
    keyPath.setContent(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return chain, keyPath


class _Scanner(ProcessProtocol):
    def __init__(self):
        self.output = []
        self.ended = Deferred()

    def outReceived(self, data):
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class TestSSLTests(TestCase):
    """
    C{testssl} against a live gate.
    """

    timeout = 300

    @inlineCallbacks
    def test_profile(self):
        """
        No finding of severity MEDIUM or higher but the test CA's trust:
        TLS 1.2 and 1.3 only, forward-secret AEAD suites only, no
        compression, no client-initiated renegotiation, no known
        vulnerability.
        """
        testssl = requireExecutable("testssl", "testssl (Debian package testssl.sh)")
        withoutSecretEnvironment(self)
        directory = FilePath(self.mktemp())
        directory.makedirs()
        chain, key = issueTestCertificate(directory)
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                directory.child("data").path,
                "--store",
                "memory",
                "--api",
                "none",
                "--listen",
                "ssl:0:interface=127.0.0.1",
                "--tls-cert",
                chain.path,
                "--tls-key",
                key.path,
            ]
        )
        root = startServer(self, options)
        [address] = yield root.getServiceNamed("gate").addresses()

        report = directory.child("testssl.json")
        scanner = _Scanner()
        transport = reactor.spawnProcess(
            scanner,
            testssl,
            [
                testssl,
                "--quiet",
                "--color",
                "0",
                "--warnings",
                "batch",
                "--severity",
                "MEDIUM",
                "--jsonfile",
                report.path,
                "127.0.0.1:{}".format(address.port),
            ],
            env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": directory.path},
        )
        killAtCleanup(self, scanner, transport)
        yield scanner.ended
        output = b"".join(scanner.output).decode("utf-8", "replace")
        self.assertTrue(report.exists(), "testssl wrote no report:\n" + output)
        findings = json.loads(report.getContent())
        self.assertIn("cert_chain_of_trust", {f["id"] for f in findings}, output)
        failing = [
            "{severity} {id}: {finding}".format(**f)
            for f in findings
            if f["severity"] in FAILING and f["id"] not in EXCUSED
        ]
        self.assertEqual(failing, [], output)
