# -*- test-case-name: tests.test_api -*-
"""
JSON log lines for log shippers: one event per line, as twistd's
C{--logger} takes them (twistd owns logging, so the choice is made on
twistd's command line, before C{im})::

    twistd --logger imserver.logs.jsonLogger -n im

Each line is one JSON object::

    {"time": "2026-05-01T12:00:00.123Z", "level": "info",
     "namespace": "imserver.api.http.Router",
     "message": "API POST /v1/messages -> 200 (3.1 ms)",
     "method": "POST", "route": "/v1/messages", "status": 200, ...}

C{time} (UTC, ISO 8601), C{level}, C{namespace} and C{message} (the event
formatted as the text log would show it) are always there; the event's own
fields follow at the top level (a field whose name is taken by one of those
four is written as C{field_<name>}); a logged failure adds C{error} and
C{traceback}.  Values that are not JSON scalars are written as their
C{str()}.  Non-ASCII text is escaped, so every line is ASCII.
"""

import json
import math
import sys
from datetime import datetime, timezone

from twisted.logger import FileLogObserver, formatEvent

#: Keys of legacy (C{twisted.python.log}) events that repeat what the
#: fixed fields already say, or are internal to it.
_LEGACY_KEYS = frozenset(
    ["message", "time", "format", "isError", "printed", "why", "failure", "system"]
)
_FIXED = ("time", "level", "namespace", "message")
_MAX_VALUE = 1000


def _scalar(value):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)[:_MAX_VALUE]


def formatJSONLine(event):
    """
    Format a log event as one line of JSON (with its newline).

    @type event: L{dict}
    @rtype: L{str}
    """
    when = event.get("log_time")
    level = event.get("log_level")
    record = {
        "time": datetime.fromtimestamp(when, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
        if when is not None
        else None,
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    # Events of twisted.python.log (legacy) always carry isError.
    skipped = _LEGACY_KEYS if "isError" in event else ()
    for key, value in event.items():
        if key.startswith("log_") or key in skipped:
            continue
        name = "field_" + key if key in _FIXED or key in ("error", "traceback") else key
        record[name] = _scalar(value)
    return json.dumps(record, ensure_ascii=True, allow_nan=False) + "\n"


def jsonLineObserver(outFile):
    """
    A log observer writing L{formatJSONLine} lines to C{outFile}.

    @param outFile: a text file.
    @rtype: L{FileLogObserver}
    """
    return FileLogObserver(outFile, formatJSONLine)


def jsonLogger():
    """
    The log observer factory for C{twistd --logger imserver.logs.jsonLogger}:
    JSON lines on standard output (twistd calls it before it redirects
    standard output into the log).  Use it with C{-n}/C{--nodaemon}: a
    daemonized twistd has no standard output.

    @rtype: L{FileLogObserver}
    """
    return jsonLineObserver(sys.stdout)
