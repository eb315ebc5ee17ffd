"""Parts of examples/update.py: its flags (config), the checkpoint split (split), the HTTP client."""
