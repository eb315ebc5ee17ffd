"""Remote-instance loading ("fork"): a new server loads its weights from a running seed server,
GPU to GPU (NCCL) or over TCP (gloo on CPU), instead of from disk.

Client side: `loader.RemoteInstanceFormat` (`--load-format remote_instance`, flags in
`settings`), calling the seed through `seed_client`. Seed side, on every server: `routes` (HTTP
front) and `seed.WeightSender` (in each rank). Shared: `manifest` (what both must agree on, with
its diff), `plan` (groups and modes), `backend` (the transfer seam and its registry). The flow is
traced in docs/structure.md; the design choices are in the README ("Remote-instance loading").
"""
