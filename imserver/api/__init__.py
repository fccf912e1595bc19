# -*- test-case-name: tests.test_api -*-
"""
The HTTP API: what the app backend calls.  JSON over C{twisted.web} on its
own listener (C{--api}, loopback by default), never on a client listener.
Every route but C{GET /health} (and C{/health/live}, C{/health/ready})
needs C{Authorization: Bearer <admin token>}.

docs/api.md shows every route with curl; docs/openapi.yaml is the OpenAPI
document, which tests/test_api.py keeps equal to L{ROUTES}.

The modules, outside in:

  - L{imserver.api.http}: L{ApiSite} (the C{twisted.web} site; counts
    requests in flight, logs nothing by itself), L{ApiRequest} (refuses a
    body above C{api_max_body} with 413 from its C{Content-Length} before
    reading it, or while reading a chunked one), L{ApiRoot} (the root
    resource; L{ApiRoot.mount} adds C{/metrics} beside the routes, served
    without the admin token), L{Router} (method + path template -> handler,
    the token check, JSON in and out) and L{ConnectionTracker} (the
    listening factory; on stop it waits for the requests in flight, then
    closes the connections, aborting them after the grace period).
  - L{imserver.api.errors}: the error codes, L{ApiError}, and the mapping
    of the logic layer's errors to answers
    C{{"error": {"code": ..., "message": ...}}}.
  - L{imserver.api.validation}: the fields of the JSON bodies.
  - L{imserver.api.handlers}: L{ROUTES}, the handlers (L{Api}) and
    L{makeSite}.  The handlers call the logic layer (the gate factory's
    C{messenger}, C{groups}, C{registry}, C{broadcast}) and never block:
    every store access returns a L{Deferred}.
  - L{imserver.api.tokens}: the admin token (L{loadAdminToken}).

The one-process L{imserver.interfaces.IGateDirectory} behind the
dispatcher route (C{GET /v1/gates}) is
L{imserver.registry.memory.MemoryGateDirectory}.
"""

from imserver.api.errors import ERROR_CODES, ApiError
from imserver.api.handlers import PUBLIC_PATHS, ROUTES, Api, makeSite
from imserver.api.http import ApiRequest, ApiRoot, ApiSite, ConnectionTracker, Router
from imserver.api.tokens import loadAdminToken
from imserver.registry.memory import MemoryGateDirectory

__all__ = [
    "ERROR_CODES",
    "PUBLIC_PATHS",
    "ROUTES",
    "Api",
    "ApiError",
    "ApiRequest",
    "ApiRoot",
    "ApiSite",
    "ConnectionTracker",
    "MemoryGateDirectory",
    "Router",
    "loadAdminToken",
    "makeSite",
]
