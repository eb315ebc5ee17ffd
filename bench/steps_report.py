"""The training-step benchmark's summary and table (pure; bench/run.py --steps)."""

from __future__ import annotations

import statistics

SETTLED_FROM = 3  # ours keeps two steps' buffers (the last good one and the new one): from step 3
# on, every step runs on pooled memory; the other systems' steps are alike from step 2


def summarize_steps(result: dict) -> dict:
    steps = result.get("steps") or []
    if not steps:
        return {"error": (result.get("error") or "no steps ran").strip().splitlines()[-1]}
    first = SETTLED_FROM if result["system"].startswith("ours") else 2
    settled = [s for s in steps if s["step"] >= first] or steps
    seconds = [s["seconds"] for s in settled]
    out = {
        "steps": len(steps),
        "first_s": steps[0]["seconds"],
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "gbps": result["checkpoint_bytes"] / statistics.median(seconds) / 1e9,
        "exact": all(s["exact"] for s in steps),
        "errors": sorted({s["error"] for s in steps if s.get("error")}),
        "rss_gb": (steps[0]["rss"] / 1e9, steps[-1]["rss"] / 1e9),
        "device_gb": (steps[0]["device_used"] / 1e9, steps[-1]["device_used"] / 1e9),
    }
    registers = [s["register_s"] for s in settled if "register_s" in s]
    if registers:
        out["register_median_s"] = statistics.median(registers)
    return out


def steps_table(results: dict[str, dict], checkpoint_bytes: int, device: str) -> str:
    lines = [
        f"{checkpoint_bytes / 1e9:.2f} GB per step on {device}; seconds from files complete to "
        "the update applied (settled steps: median [min-max]); RSS and device memory at the "
        "first and last step",
        "",
        "| system | steps | first step s | settled step s | GB/s | of it register s | exact "
        "| RSS GB first/last | device GB first/last |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, result in results.items():
        s = summarize_steps(result) if result else {"error": "no result"}
        if "median_s" not in s:
            lines.append(f"| {system} | - | - | - | - | - | - | - | - |  error: {s['error']}")
            continue
        reg = f"{s['register_median_s']:.3f}" if "register_median_s" in s else "-"
        err = f" ({'; '.join(s['errors'])[:200]})" if s["errors"] else ""
        lines.append(
            f"| {system} | {s['steps']} | {s['first_s']:.3f} | {s['median_s']:.3f} "
            f"[{s['min_s']:.3f}-{s['max_s']:.3f}] | {s['gbps']:.1f} | {reg} | "
            f"{'yes' if s['exact'] else 'NO'}{err} | {s['rss_gb'][0]:.1f}/{s['rss_gb'][1]:.1f} | "
            f"{s['device_gb'][0]:.1f}/{s['device_gb'][1]:.1f} |"
        )
    return "\n".join(lines)
