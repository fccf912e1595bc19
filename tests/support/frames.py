# -*- test-case-name: tests.test_protocol,tests.test_delivery,tests.test_rpc,tests.test_client -*-
"""
Reading frames back: the tests' own reference parser of the wire format
(docs/protocol.md), independent of L{imserver.framing}.
"""

import struct

from imserver.pb import im_pb2 as pb


def readFrames(data):
    """
    Split written bytes back into frames (the test's own reference parser).
    """
    frames = []
    while data:
        (length,) = struct.unpack("!I", data[:4])
        frames.append(pb.Frame.FromString(data[4 : 4 + length]))
        data = data[4 + length :]
    return frames


def written(transport):
    """
    The frames written to C{transport} since the last call.
    """
    frames = readFrames(transport.value())
    transport.clear()
    return frames
