# -*- test-case-name: tests.test_bench -*-
"""
The table of scenarios: one entry each, the subcommand's name to its
L{imserver.bench.scenario.Scenario} subclass.  A new scenario is a module
with a C{Scenario} and a C{Load} subclass and a line here.
"""

from imserver.bench.fanout import Fanout
from imserver.bench.hold import Hold
from imserver.bench.p2p import P2P
from imserver.bench.ping import Ping
from imserver.bench.reference import Reference
from imserver.bench.storm import Storm

#: The scenarios, by subcommand.
SCENARIOS = {scenario.name: scenario for scenario in (Fanout, Hold, P2P, Ping, Storm)}

#: The worker-side loads, by name: every scenario's and the reference's.
LOADS = {scenario.name: scenario.Load for scenario in list(SCENARIOS.values()) + [Reference]}
