"""
The C{twistd im} plugin.  Nothing is imported or done here at import time
beyond declaring where the real code lives (L{imserver.tap}).
"""

from twisted.application.service import ServiceMaker

imserver = ServiceMaker(
    "imserver",
    "imserver.tap",
    "imserver instant-messaging gate (TLS TCP clients, protobuf frames)",
    "im",
)
