"""Parts of the updater (ckpt_engine.update): its flags (config), the checkpoint split (split), the HTTP client."""
