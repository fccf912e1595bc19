# -*- test-case-name: tests.test_cluster -*-
"""
The cluster's gate directory, in Redis: the gates the dispatcher hands out,
filtered by the gates' leases (L{imserver.registry.redis}).

Keys (one Redis)::

    im:gates                   hash: gate id -> JSON addresses
    im:gate:<gate id>          the gate's lease (the registry's)

On a Redis Cluster (C{cluster}, by default whether the connection is a
L{imserver.rediscluster.ClusterConnection}), the same under the one hash
tag C{{gates}}, so that the filtering script runs in one slot::

    im:{gates}                 hash: gate id -> JSON addresses
    im:{gates}:lease:<gate id> the gate's lease (the registry's)
"""

import json

from twisted.internet.defer import gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from imserver.interfaces import IGateDirectory
from imserver.redisclient import RedisUnavailable
from imserver.rediscluster import ClusterConnection
from imserver.registry.redis import CLUSTER_GATE_KEY_PREFIX, GATE_KEY_PREFIX, GATES_TAG

#: The gate directory.
GATES_KEY = "im:gates"
#: The gate directory, in cluster mode (in the slot of the leases).
CLUSTER_GATES_KEY = "im:" + GATES_TAG

#: KEYS: the directory.  Returns C{{gate id, addresses, ...}} of the gates
#: with a lease; forgets the others.  C{%s}: the leases' key prefix.
_GATES_TEMPLATE = """
local entries = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #entries, 2 do
  if redis.call('EXISTS', '%s' .. entries[i]) == 1 then
    out[#out + 1] = entries[i]
    out[#out + 1] = entries[i + 1]
  else
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
return out
"""


@implementer(IGateDirectory)
class RedisGateDirectory:
    """
    The live gates of the cluster, for the dispatcher: a hash of gate id ->
    addresses, filtered by the gates' leases (a gate without a lease is
    dropped from it).  Advertisements of this process are remembered and
    written again by L{readvertise}, after Redis comes back or this gate's
    lease lapsed.
    """

    log = Logger()

    def __init__(self, connection, cluster=None):
        """
        @param connection: the L{imserver.redisclient.RedisConnection}, or
            the L{imserver.rediscluster.ClusterConnection}.
        @param cluster: whether C{connection} is a Redis Cluster (default:
            whether it is a L{ClusterConnection}).
        """
        if cluster is None:
            cluster = isinstance(connection, ClusterConnection)
        self.connection = connection
        self.key = CLUSTER_GATES_KEY if cluster else GATES_KEY
        self._mine = {}
        prefix = CLUSTER_GATE_KEY_PREFIX if cluster else GATE_KEY_PREFIX
        self._gates = connection.script(_GATES_TEMPLATE % (prefix,), "directory.gates")

    def advertise(self, gateId, addresses):
        addresses = [tuple(a) for a in addresses]
        self._mine[gateId] = addresses
        return self._write(gateId, addresses)

    def _write(self, gateId, addresses):
        d = self.connection.execute("HSET", self.key, gateId, json.dumps(addresses))

        def unavailable(failure):
            failure.trap(RedisUnavailable)
            self.log.info("gate {gate} is advertised once Redis is available", gate=gateId)

        return d.addCallbacks(lambda _: None, unavailable)

    def readvertise(self):
        """
        Write every advertisement of this process again.
        """
        return gatherResults([self._write(g, a) for g, a in self._mine.items()])

    def withdraw(self, gateId):
        self._mine.pop(gateId, None)
        return self.connection.execute("HDEL", self.key, gateId).addCallback(lambda _: None)

    def gates(self):
        def parse(reply):
            result = {}
            for i in range(0, len(reply), 2):
                try:
                    addresses = [tuple(a) for a in json.loads(reply[i + 1])]
                except ValueError:
                    continue
                result[reply[i].decode("utf-8")] = addresses
            return result

        return self._gates([self.key]).addCallback(parse)
