"""The fault suite: each test injects one fault (a row of the README's failure policy, a defect
of issue 14, or an earlier one), asserts the expected behaviour and a bound on the seconds until
it shows, and adds a row to the fault table.

Every test here carries the `faults` marker (`pytest -m faults` runs the suite alone; CI runs it
as part of `-m "not gpu"`). The table (fault, expected, observed, seconds to the error, bound)
is written when the session ends, to `$CKPT_ENGINE_FAULTS_TABLE` (default `build/faults.md`,
ignored by git). `docs/faults.md` is the table of one recorded run, made with:

    CKPT_ENGINE_FAULTS_TABLE=docs/faults.md .venv/bin/python -m pytest tests/faults
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / "ckpt_engine"))  # reuse the ckpt_engine tests' helpers


@dataclass
class Row:
    fault: str
    expected: str
    observed: str
    seconds: float
    bound: float
    test: str


ROWS: list[Row] = []
_START = time.monotonic()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def fault_row(request):
    """`fault_row(fault, expected, observed, seconds, bound)`: add the row to the table, then
    assert that the fault showed within its bound."""

    def record(fault: str, expected: str, observed: str, seconds: float, bound: float) -> None:
        ROWS.append(Row(fault, expected, observed, seconds, bound, request.node.name))
        assert seconds <= bound, f"{fault}: {seconds:.1f} s, past the bound of {bound} s"

    return record


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    target = Path(os.environ.get("CKPT_ENGINE_FAULTS_TABLE") or REPO / "build" / "faults.md")
    target.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Fault table",
        "",
        "Written by the fault suite (`tests/faults`, see its `conftest.py`): each row is a test",
        "that injects the fault, asserts the expected behaviour, and fails if it takes longer",
        "than the bound. Seconds: from the fault's injection to the observed behaviour.",
        'CI (`pytest -m "not gpu"`) writes the same table to `build/faults.md`; this file is',
        "regenerated with `CKPT_ENGINE_FAULTS_TABLE=docs/faults.md .venv/bin/python -m pytest"
        " tests/faults`.",
        "",
        f"Run: {now}, {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, CPU only,",
        f"`pytest tests/faults` ({len(ROWS)} rows, {time.monotonic() - _START:.0f} s in all;"
        " other work shared the machine).",
        "",
        "| fault | expected | observed | seconds | bound |",
        "|---|---|---|---|---|",
    ]
    for r in ROWS:
        cells = [r.fault, r.expected, r.observed.replace("|", "\\|").replace("\n", " ")]
        lines.append("| " + " | ".join(cells) + f" | {r.seconds:.2f} | {r.bound:g} |")
    target.write_text("\n".join(lines) + "\n")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"fault table ({len(ROWS)} rows): {target}")
