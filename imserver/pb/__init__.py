"""
Generated protobuf code for the wire protocol (``proto/im.proto``).

The modules here are produced by ``make proto`` and must never be edited by
hand; ``tests/test_proto.py`` fails when they are stale.
"""
