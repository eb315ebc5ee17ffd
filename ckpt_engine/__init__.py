"""ckpt-engine: move LLM weights into running inference engines.

The parameter-server side. This package knows no inference engine: `workers` imports it, never
the reverse.
"""

__version__ = "0.1.0"
