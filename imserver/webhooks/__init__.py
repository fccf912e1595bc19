"""
Callbacks to the app backend.

  - L{events}: the events (C{user.online}, C{user.offline},
    C{message.stored}, C{group.changed}), their JSON, and the outbox entries
    they are kept in until delivered.
  - the outbox itself is part of the message store
    (L{imserver.interfaces.IOutbox}): an event is as durable as the message
    or change it reports.
  - L{sender}: reads the outbox and delivers its events, at least once and
    in order per key, with retries; L{http}: the signed POST
    (L{signing}) of one event.
  - L{presence}: C{user.online}/C{user.offline} from the gate's session
    registrations, coalescing flaps, and the offlines a crashed run left.
  - L{service}: the options' checks and the service under the root;
    L{metrics}: the C{imserver_webhook_*} metrics.

Nothing here is loaded without C{--webhook}.  The contract (schema,
signature, retries) is in docs/api.md, "Webhooks".
"""
