"""Fixtures shared by the server tests: the tiny checkpoints, made once per session."""

from __future__ import annotations

import pytest
from workers_testutil import FAMILIES, make_hf_model, save_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{name: (checkpoint folder, the transformers model it was saved from)}."""
    out = {}
    for name, spec in FAMILIES.items():
        model = make_hf_model(spec["family"], **spec["overrides"])
        path = save_checkpoint(model, tmp_path_factory.mktemp(name), tokenizer=spec["tokenizer"])
        out[name] = (path, model)
    return out
