"""The reference inference server: an HTTP front process and one process per TP rank.

`__main__` (launcher + front), `http` (routes), `frontend` (FIFO-serialised commands, weight
state), `ranks` (front-side handle on the rank processes), `messages` (typed records over the
pipes), `rank` (a rank's main loop), `worker` (what a rank can do; the RPC allowlist),
`generate` (greedy decoding), `schemas` (request bodies), `state`, `tokenizer`.
"""
