# -*- test-case-name: tests.test_startup,tests.test_tap -*-
"""
The checks L{imserver.tap.Options} makes before L{imserver.tap.makeService}
creates anything: the files the options name, the data directory
(L{imserver.datadir}), the certificates, the endpoints and the Redis CA.
Each raises a L{usage.UsageError} whose message is one line naming the
option at fault and what to do about it; none writes anything.
"""

import os

from twisted.python import usage
from twisted.python.filepath import FilePath

from imserver.datadir import (
    ADMIN_TOKEN_FILE_NAME,
    CERT_FILE_NAME,
    KEY_FILE_NAME,
    SECRET_FILE_NAME,
)


def checkFiles(options):
    """
    Check the files the options name and the data directory: what
    L{imserver.tap.makeService} reads can be read and used, what it
    creates can be created.  Nothing is written.

    @param options: the L{imserver.tap.Options}, every other option
        checked.
    @raise usage.UsageError: naming the option, if not.
    """
    from imserver.auth import MIN_SECRET_LENGTH, SECRET_ENV

    dataDir = FilePath(options["data-dir"])
    described = [("--listen", d) for d in options["listen"]]
    if options["api"] is not None:
        described.append(("--api", options["api"]))
    selfSigned = options["tls-cert"] is None and any(
        needsDefaultCertificate(d) for _, d in described
    )
    # The files of the data directory makeService reads, with what to
    # do if one cannot be used, and what it writes there.
    reads, writes = [], []
    if options["secret-file"] is None and not os.environ.get(SECRET_ENV):
        reads.append(
            (
                SECRET_FILE_NAME,
                "fix it, delete it to have a new one generated (tokens signed "
                "with the old one stop working), or give --secret-file",
            )
        )
    if options["api"] is not None and options["admin-token-file"] is None:
        reads.append((ADMIN_TOKEN_FILE_NAME, "fix it, or delete it to have a new one generated"))
    for name, _ in reads:
        if not dataDir.child(name).exists():
            writes.append(name)
    if selfSigned and not (
        dataDir.child(CERT_FILE_NAME).exists() and dataDir.child(KEY_FILE_NAME).exists()
    ):
        writes.append(CERT_FILE_NAME)
    if options["store"] == "sqlite":
        writes.append("the message database")
    _checkDataDir(dataDir, writes)

    for name, remedy in reads:
        if name not in writes:
            _readSecret("--data-dir", dataDir.child(name), remedy)
    if options["secret-file"] is not None:
        _readSecret("--secret-file", FilePath(options["secret-file"]))
    elif os.environ.get(SECRET_ENV) and len(os.environ[SECRET_ENV].strip()) < MIN_SECRET_LENGTH:
        raise usage.UsageError(
            "${}: shorter than {} bytes; set a longer secret, or unset it to use "
            "<data-dir>/{}".format(SECRET_ENV, MIN_SECRET_LENGTH, SECRET_FILE_NAME)
        )
    if options["api"] is not None and options["admin-token-file"] is not None:
        _readSecret(
            "--admin-token-file",
            FilePath(options["admin-token-file"]),
            "or leave the option out to have one generated in the data directory",
        )
    certificate = None
    if options["tls-cert"] is not None:
        certificate = (FilePath(options["tls-cert"]), FilePath(options["tls-key"]))
        _checkCertificate(*certificate)
    elif selfSigned:
        certificate = _selfSignedForCheck(dataDir)
    _checkEndpoints(described, certificate, options.settings.listen_backlog)


def _reason(error):
    """
    Why C{error} happened, as a clause: for an L{OSError} without its
    C{[Errno n]} and path, without a final full stop.
    """
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return (str(error) or type(error).__name__).rstrip(". ")


def _readSecret(option, path, remedy=None):
    """
    Check that the secret (or admin token) file at C{path} can be read and
    is long enough.

    @param option: what to name in the message: the option giving the
        file, or C{--data-dir} for a file in the data directory.
    @param remedy: what to do about it; by default, give a readable file.
    @raise usage.UsageError: if not.
    """
    from imserver.auth import MIN_SECRET_LENGTH

    head = "{} {}".format(option, path.path)
    if option == "--data-dir":
        head = "--data-dir {}: {}".format(path.parent().path, path.basename())
    if remedy is None:
        remedy = "give a readable file holding at least {} bytes".format(MIN_SECRET_LENGTH)
    elif remedy.startswith("or "):
        remedy = "give a readable file holding at least {} bytes, {}".format(
            MIN_SECRET_LENGTH, remedy
        )
    try:
        content = path.getContent()
    except OSError as e:
        raise usage.UsageError("{}: cannot read it ({}); {}".format(head, _reason(e), remedy))
    if len(content.strip()) < MIN_SECRET_LENGTH:
        raise usage.UsageError(
            "{}: holds fewer than {} bytes; {}".format(head, MIN_SECRET_LENGTH, remedy)
        )


def _checkDataDir(dataDir, writes):
    """
    Check that the data directory is a directory, or can be created, and
    that this user can write into it if something is to be written.

    @type dataDir: L{FilePath}
    @param writes: what is to be written there (for the message); empty if
        nothing.
    @raise usage.UsageError: naming C{--data-dir}, if not.
    """
    head = "--data-dir {}".format(dataDir.path)
    if dataDir.exists():
        if not dataDir.isdir():
            raise usage.UsageError(
                "{}: not a directory; give a directory (it is created if missing)".format(head)
            )
        if writes and not os.access(dataDir.path, os.W_OK | os.X_OK):
            raise usage.UsageError(
                "{}: this user cannot write to it (for {}); give it write permission, "
                "or give another directory".format(head, ", ".join(writes))
            )
        return
    ancestor = dataDir.parent()
    while not ancestor.exists() and ancestor.parent() != ancestor:
        ancestor = ancestor.parent()
    if not ancestor.isdir():
        raise usage.UsageError(
            "{}: cannot be created, {} is not a directory; give another directory".format(
                head, ancestor.path
            )
        )
    if not os.access(ancestor.path, os.W_OK | os.X_OK):
        raise usage.UsageError(
            "{}: cannot be created, this user cannot write to {}; create it, or give "
            "another directory".format(head, ancestor.path)
        )


def _checkCertificate(certPath, keyPath):
    """
    Check that C{--tls-cert} and C{--tls-key} can be read and go together.

    @raise usage.UsageError: naming the option at fault, if not.
    """
    from imserver.tls import serverOptions

    contents = []
    for option, path, what in [
        ("--tls-cert", certPath, "PEM certificate"),
        ("--tls-key", keyPath, "PEM private key"),
    ]:
        try:
            contents.append(path.getContent())
        except OSError as e:
            raise usage.UsageError(
                "{} {}: cannot read it ({}); give the {} file".format(
                    option, path.path, _reason(e), what
                )
            )
    try:
        serverOptions(*contents)
    except ValueError as e:
        raise usage.UsageError(
            "--tls-cert {} with --tls-key {}: {}; give a PEM certificate and its "
            "unencrypted private key".format(certPath.path, keyPath.path, _reason(e))
        )


class _NotWrittenYet:
    """
    Stands for a file of the self-signed certificate that
    L{imserver.tls.ensureSelfSigned} will write at start, while the
    endpoint descriptions are checked (L{imserver.tls.ReloadableServerOptions}
    reads only C{getContent} and C{path}).
    """

    def __init__(self, path, content):
        self.path = path
        self._content = content

    def getContent(self):
        return self._content


def _selfSignedForCheck(dataDir):
    """
    The certificate to check the C{ssl:} endpoint descriptions with when
    they use the self-signed one: the data directory's if it is there, else
    one made in memory (it is not written).

    @raise usage.UsageError: naming C{--data-dir}, if the one there cannot
        be used.
    """
    from cryptography import x509

    from imserver.tls import makeSelfSigned, serverOptions

    certPath, keyPath = dataDir.child(CERT_FILE_NAME), dataDir.child(KEY_FILE_NAME)
    if not (certPath.exists() and keyPath.exists()):
        certPEM, keyPEM = makeSelfSigned()
        return _NotWrittenYet(certPath.path, certPEM), _NotWrittenYet(keyPath.path, keyPEM)
    try:
        serverOptions(certPath.getContent(), keyPath.getContent())
        # As ensureSelfSigned reads it to see when it expires.
        x509.load_pem_x509_certificate(certPath.getContent())
    except (OSError, ValueError) as e:
        raise usage.UsageError(
            "--data-dir {}: its self-signed certificate cannot be used ({}); delete {} "
            "and {} to have new ones generated, or give --tls-cert and --tls-key".format(
                dataDir.path, _reason(e), CERT_FILE_NAME, KEY_FILE_NAME
            )
        )
    return certPath, keyPath


#: What to give instead of a wrong endpoint description, per option.
_ENDPOINT_EXAMPLES = {
    "--listen": "an endpoint string such as ssl:7443 or tcp:7000:interface=127.0.0.1",
    "--api": "an endpoint string such as tcp:7480:interface=127.0.0.1, or none",
}


def _checkEndpoints(described, certificate, backlog):
    """
    Build the endpoint of every C{--listen} and C{--api} to check it, and
    drop it: nothing listens, and building one needs no reactor.

    @param described: C{(option, description)} pairs.
    @param certificate: for L{imserver.endpoints.listenEndpoint}.
    @raise usage.UsageError: naming the option, if one cannot be built.
    """
    from imserver.endpoints import listenEndpoint, splitDescription

    for option, description in described:
        try:
            listenEndpoint(None, description, certificate, backlog)
        except (ValueError, TypeError, LookupError, OSError) as e:
            # Endpoint parsers, plugins included, raise more than ValueError:
            # an OSError for a certKey= file, an IndexError for a systemd:
            # index beyond the descriptors passed.
            if isinstance(e, OSError) and e.filename:
                raise usage.UsageError(
                    "{} {}: cannot read {} ({}); give a file this user can read".format(
                        option, description, e.filename, _reason(e)
                    )
                )
            raise usage.UsageError(
                "{} {}: {}; give {}".format(
                    option, description, _reason(e), _ENDPOINT_EXAMPLES[option]
                )
            )
        # A UNIX socket is made at start, in a directory that must be there.
        args, kwargs = splitDescription(description)
        kinds = [a.lower() for a in args]
        while kinds and kinds[0] == "haproxy":
            kinds, args = kinds[1:], args[1:]
        if kinds and kinds[0] == "unix":
            address = kwargs.get("address", args[1] if len(args) > 1 else "")
            directory = FilePath(address).parent()
            if not directory.isdir():
                raise usage.UsageError(
                    "{} {}: no directory {} for the socket; create it, or give another path".format(
                        option, description, directory.path
                    )
                )


def checkRedisCA(url, caFile):
    """
    Check that C{--redis-ca} can be read and holds a PEM certificate.

    @raise usage.UsageError: naming it, if not.
    """
    from OpenSSL import SSL, crypto

    from imserver.redisclient import clientTLSOptions

    remedy = (
        "give the PEM file of the CA (or self-signed certificate) that signs the "
        "Redis server's certificate"
    )
    if hasattr(url, "seeds"):  # a Redis Cluster: the same CA for every node
        url = url.node(*url.seeds[0])
    try:
        clientTLSOptions(url, caFile)
    except OSError as e:
        raise usage.UsageError(
            "--redis-ca {}: cannot read it ({}); {}".format(caFile, _reason(e), remedy)
        )
    except (SSL.Error, crypto.Error, ValueError) as e:
        raise usage.UsageError(
            "--redis-ca {}: not a PEM certificate ({}); {}".format(caFile, e, remedy)
        )


def needsDefaultCertificate(description):
    """
    Whether the endpoint C{description} uses the default certificate
    (C{--tls-cert}, else the self-signed one): an C{ssl:} endpoint that
    names no C{certKey=} or C{privateKey=}.
    """
    from imserver.endpoints import splitDescription

    args, kwargs = splitDescription(description)
    return args[0].lower() == "ssl" and not ("certKey" in kwargs or "privateKey" in kwargs)
