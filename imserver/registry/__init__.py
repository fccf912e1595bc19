"""
Session registry implementations (L{imserver.interfaces.ISessionRegistry}).

C{memory}: one gate process (the embedded mode).  C{redis}: cluster mode
(C{--redis}), shared by every gate, fenced by generations and gate leases;
it also holds the cluster's gate directory
(L{imserver.interfaces.IGateDirectory}).  tests/test_registry.py runs one
suite against both.
"""
