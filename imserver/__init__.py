"""
imserver: an instant-messaging server on Twisted.

See ``docs/architecture.md`` for the layers and ``docs/protocol.md`` for the
wire protocol.
"""

__version__ = "0.1.0"
