"""Push a safetensors checkpoint into running inference servers: one parameter-server rank per GPU.

    torchrun --nproc-per-node 8 examples/update.py --checkpoint-path /models/Qwen3-8B \\
        --endpoint http://localhost:30000 --inference-parallel-size 8

A thin script over the installed updater, ``ckpt_engine.update`` (its docstring describes the
steps, the flags are in ``ckpt_engine/updater/config.py``; ``--help`` lists them). The same
command without this file: ``torchrun ... -m ckpt_engine.update ...``, or the console script
``ckpt-engine-update``.
"""

import sys

from ckpt_engine.update import cli

if __name__ == "__main__":
    sys.exit(cli())
