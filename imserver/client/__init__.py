# -*- test-case-name: tests.test_client,tests.test_imclient -*-
"""
The imserver client library.

    from imserver.client import connect

    client = yield connect(reactor, "chat.example.com", 7443,
                           uid="alice", token=token, deviceId="laptop",
                           caFile="ca.pem", onNotify=print)
    yield client.ping()
    yield client.close()

Two levels: L{ClientProtocol} is one connection (auth, heartbeat, requests
and notifications; L{imserver.client.protocol}), and L{IMClient} a session
that survives disconnects (L{imserver.client.imclient}).

The connection is TLS with certificate and hostname verification
(service_identity) unless C{tls=False} is asked for explicitly.  After auth
the client sends a C{ping} whenever it has sent nothing for the heartbeat
interval the server gave it, and drops the connection when a ping is not
answered within that interval.
"""

from imserver.client.imclient import IMClient, fullJitterBackoff
from imserver.client.protocol import ClientProtocol, clientEndpoint, connect

__all__ = ["ClientProtocol", "IMClient", "clientEndpoint", "connect", "fullJitterBackoff"]
