"""
Session registry implementations (L{imserver.interfaces.ISessionRegistry}).

C{memory}: one gate process.  Redis (cluster mode) comes later.
"""
