"""Draw the README's performance plot: update seconds, ours vs upstream checkpoint-engine, by
workload and GPU count, from bench/summary.json (the best-of-3 figures of bench/RESULTS.md).

    python bench/plot.py [--data bench/summary.json] [--out docs/performance.png]

Needs matplotlib (`pip install -e ".[bench]"`); not run in CI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE / "summary.json"))
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "performance.png"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(Path(args.data).read_text())["rows"]
    labels = [
        f"{r['label']}\n{r['gpus']} GPU{'s' if r['gpus'] > 1 else ''} ({r['device']})" for r in rows
    ]
    x = range(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    ours = ax.bar(
        [i - width / 2 for i in x], [r["ours_s"] for r in rows], width, label="ckpt-engine"
    )
    theirs = ax.bar(
        [i + width / 2 for i in x],
        [r["upstream_s"] for r in rows],
        width,
        label="upstream checkpoint-engine 0.4.2",
    )
    ax.bar_label(ours, fmt="%.2f s", fontsize=8)
    ax.bar_label(theirs, fmt="%.2f s", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("update time (s), best of 3")
    ax.set_title("One weight update, 17-21 GB (lower is better)", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
