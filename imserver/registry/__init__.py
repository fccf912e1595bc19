"""
Session registry implementations (L{imserver.interfaces.ISessionRegistry}).

C{memory}: one gate process (the embedded mode).  C{redis}: cluster mode
(C{--redis}), shared by every gate, fenced by generations and gate leases.
Each also holds its mode's gate directory
(L{imserver.interfaces.IGateDirectory}): this gate alone, or the cluster's.
tests/test_registry.py runs one suite against both registries.
"""
