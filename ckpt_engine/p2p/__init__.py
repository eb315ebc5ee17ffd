"""P2P: ranks of new inference instances pull a checkpoint from the host memory of ranks that
already hold it, without a collective over the whole fleet.

- ``protocol``: the portable transport's wire (typed, versioned JSON headers + raw bytes).
- ``transport``: the Transport / OwnerServer / Reader interface and its registry.
- ``tcp``: the portable transport (ZMQ/TCP, tokens, bounds checks, zero-copy sends).
- ``mooncake``: the optional Mooncake transfer-engine transport (RDMA or its TCP protocol).
- ``service``: owner side as the parameter server runs it; reader opening with fallback.
- ``assign``: bucket order and reader assignment balancing owners' and receivers' bytes (pure).
- ``prefetch``: a receiver's reads into staging buffers, ahead of the broadcast.
The update driver itself is ``ckpt_engine.ps.p2p``.

Trust: a checkpoint's token, in the saved metas file, is what lets a reader in; the file
(written mode 0600) must be protected like a key. The tcp transport sends the token and the
data unencrypted: run it on a trusted network.
"""
