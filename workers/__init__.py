"""The inference side of ckpt-engine: the reference server, its model, and engine adapters."""
