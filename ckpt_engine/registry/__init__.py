"""Who holds which weights: a registry on Redis that sources publish to and newcomers query.

- ``records``: the record a source publishes (pure): schema, validation, the manifest digest,
  the choice of a source (ready, digest match, same TP first, least busy) and why others were
  passed over.
- ``redis_store``: the I/O: publish with expiry, list, wait for a source (event-driven through
  Redis pub/sub, bounded), busy counters, opaque documents (P2P metas); ``Heartbeat`` republishes
  a record until stopped.

The registry carries metadata only, never weights; transfers stay peer to peer.
"""
