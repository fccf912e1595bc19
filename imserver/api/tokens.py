# -*- test-case-name: tests.test_api -*-
"""
The API's admin bearer token (not the client-token secret).
"""

from twisted.logger import Logger
from twisted.python.filepath import FilePath

from imserver.auth import createSecretFile, loadSecret
from imserver.datadir import ADMIN_TOKEN_FILE_NAME

log = Logger()


def loadAdminToken(dataDir, tokenFile=None):
    """
    The admin bearer token: the content of C{tokenFile} if given (which
    must exist), else of C{<dataDir>/admin-token}, generated if absent (32
    random bytes as hex, mode 0600), like the client-token secret.

    @param dataDir: a L{FilePath}.
    @param tokenFile: a path (L{str}) or L{None}.
    @rtype: L{bytes}
    @raise ValueError: if it cannot be read or is shorter than 16 bytes.
    """
    if tokenFile is None:
        path = dataDir.child(ADMIN_TOKEN_FILE_NAME)
        if not path.exists():
            createSecretFile(path)
            log.info("generated a new HTTP API admin token in {path}", path=path.path)
    else:
        path = FilePath(tokenFile)
    return loadSecret(secretFile=path, environ={})
