"""
Session registry implementations (L{imserver.interfaces.ISessionRegistry}).

C{memory}: one gate process (the embedded mode).  C{redis}: cluster mode
(C{--redis}), shared by every gate, fenced by generations and gate leases;
C{remote}: the sessions of other gates it returns.  Each mode has its gate
directory (L{imserver.interfaces.IGateDirectory}): this gate alone (in
C{memory}), or the cluster's (C{redisdirectory}).
tests/test_registry.py runs one suite against both registries.
"""
