# -*- test-case-name: tests.test_tap -*-
"""
The layout of a gate's data directory (C{--data-dir}): the name of every
file the gate reads or generates there, in one place.

  - L{SECRET_FILE_NAME}: the token-signing secret (L{imserver.auth}),
    unless C{--secret-file} or C{$IMSERVER_SECRET} gives it;
  - L{ADMIN_TOKEN_FILE_NAME}: the HTTP API's bearer token
    (L{imserver.api.loadAdminToken}), unless C{--admin-token-file} gives it;
  - L{CERT_FILE_NAME} and L{KEY_FILE_NAME}: the self-signed certificate
    and its key (L{imserver.tls.ensureSelfSigned}), unless C{--tls-cert}
    and C{--tls-key} give one;
  - L{MESSAGES_FILE_NAME}: the SQLite message database (C{--store
    sqlite}), with SQLite's C{-wal} and C{-shm} files beside it.

The server, the chat client and the command line find the files by these
names, starting from L{DEFAULT_DATA_DIR} unless told otherwise.
"""

#: The data directory when C{--data-dir} is not given, relative to the
#: working directory.
DEFAULT_DATA_DIR = "imserver-data"

#: The token-signing secret.
SECRET_FILE_NAME = "secret"
#: The HTTP API's admin bearer token.
ADMIN_TOKEN_FILE_NAME = "admin-token"
#: The self-signed certificate (PEM); clients trust it with C{--ca}.
CERT_FILE_NAME = "tls-cert.pem"
#: The self-signed certificate's private key (PEM).
KEY_FILE_NAME = "tls-key.pem"
#: The SQLite message database.
MESSAGES_FILE_NAME = "messages.sqlite3"
