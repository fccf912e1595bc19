"""
Generated protobuf code: the client wire protocol (``proto/im.proto``,
``im_pb2``) and the gate bus between gates in cluster mode
(``proto/bus.proto``, ``bus_pb2``).

The modules here are produced by ``make proto`` and must never be edited by
hand; ``tests/test_proto.py`` fails when they are stale.
"""
