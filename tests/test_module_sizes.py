"""STYLE.md's habit 2, checked: every module of the product (ckpt_engine/, workers/) stays under
400 lines; one that grows past it is split along a seam (a piece with one role), not cut."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 400


def test_every_module_is_under_400_lines():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for package in ("ckpt_engine", "workers")
        for p in sorted((ROOT / package).rglob("*.py"))
    }
    assert len(sizes) > 50, sizes  # the packages were found
    over = {path: n for path, n in sizes.items() if n >= LIMIT}
    assert not over, f"modules of {LIMIT} lines or more (split each along a seam): {over}"
