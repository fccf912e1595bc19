# -*- test-case-name: tests.test_chat -*-
"""
Why a connection or a request failed, in words for the user: L{describe},
and for a refused server certificate the problem (L{certificateProblem})
and what to do about it (L{certificateHint}).
"""

from imserver.pb import im_pb2 as pb


def describe(reason):
    """
    A short human-readable account of why something failed.

    @param reason: an exception (or a L{pb.Kicked}).
    @rtype: L{str}
    """
    if isinstance(reason, pb.Kicked):
        try:
            name = pb.KickReason.Name(reason.reason)
        except ValueError:
            name = str(reason.reason)
        return "{}: {}".format(name, reason.message) if reason.message else name
    code = getattr(reason, "code", None)
    message = getattr(reason, "message", None)
    if isinstance(code, int) and isinstance(message, str):
        try:
            name = pb.ErrorCode.Name(code)
        except ValueError:
            name = str(code)
        return "{}: {}".format(name, message) if message else name
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover
        SSL = None
    if SSL is not None and isinstance(reason, SSL.Error):
        details = [
            part[-1]
            for part in (reason.args[0] if reason.args else [])
            if isinstance(part, tuple) and part and part[-1]
        ]
        return "TLS failed: {}".format("; ".join(details) or "handshake error")
    return str(reason) or type(reason).__name__


#: L{certificateProblem}'s answers.
UNTRUSTED = "untrusted"
WRONG_NAME = "wrong name"


def certificateProblem(reason):
    """
    Did a connection fail because of the server's certificate?

    @param reason: why it failed (an exception).
    @return: L{UNTRUSTED} (it does not chain to a trusted certificate,
        or has expired), L{WRONG_NAME} (it does not name the host), or
        L{None} (something else).
    """
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover
        return None
    if isinstance(reason, SSL.Error) and "certificate verify failed" in describe(reason):
        return UNTRUSTED
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(reason, VerificationError):
        return WRONG_NAME
    return None


def certificateHint(problem, host=None, trusted=None):
    """
    What to do about a certificate refused for C{problem}.

    @param problem: L{UNTRUSTED} or L{WRONG_NAME}.
    @param host: the host name the certificate must name.
    @param trusted: what is trusted, in words.
    @rtype: L{str}
    """
    if problem == WRONG_NAME:
        return (
            "the gate's certificate does not name {}: give --host a name it"
            " holds (the self-signed one names localhost, 127.0.0.1 and ::1)".format(
                host or "this host"
            )
        )
    return (
        "the gate's certificate is not trusted{}: pass --ca FILE with the"
        " gate's certificate (or its CA's), or --data-dir DIR naming the server's"
        " data directory (which holds tls-cert.pem)".format(
            " (this chat trusts {})".format(trusted) if trusted else ""
        )
    )
