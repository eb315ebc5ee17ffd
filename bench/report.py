"""Summary and table of one benchmark run (bench/run.py): pure functions over the per-rank
records that bench/ours.py and bench/upstream.py write."""

from __future__ import annotations

import statistics

GiB = 1 << 30
MiB = 1 << 20
TARGET_1GPU_S = 0.37
TARGET_CEILING = 0.85
TARGET_REGISTER_GBPS = 10.0


def _side(ranks: list[dict] | None) -> dict | None:
    if not ranks:
        return None
    first = ranks[0]
    s: dict = {
        "device": first.get("device", first["device_type"]),
        "h2d_gbps": min(r["h2d_gbps"] for r in ranks),
        "checkpoint_bytes": first["checkpoint_bytes"],
        "floor_s": max(r["own_bytes"] / (r["h2d_gbps"] * 1e9) for r in ranks),
    }
    if "gather_s" in first:
        s["gather_s"] = max(r["gather_s"] for r in ranks)
    s["register"] = {}
    for kind in first.get("register", {}):
        seconds = max(r["register"][kind]["seconds"] for r in ranks)
        nbytes = sum(r["register"][kind]["bytes"] for r in ranks)
        s["register"][kind] = {"seconds": seconds, "gbps": nbytes / seconds / 1e9, "bytes": nbytes}
        if all("warm" in r["register"][kind] for r in ranks):  # again, the host pool reused
            seconds = max(r["register"][kind]["warm"]["seconds"] for r in ranks)
            s["register"][f"{kind}_warm"] = {
                "seconds": seconds,
                "gbps": nbytes / seconds / 1e9,
                "bytes": nbytes,
            }
    for key in ("warmup", "updates"):
        runs = []
        for i in range(len(first.get(key, []))):
            per_rank = [r[key][i] for r in ranks]
            runs.append(
                {
                    "seconds": max(u["seconds"] for u in per_rank),
                    "exact": all(u["exact"] for u in per_rank),
                    "errors": [
                        u["error"] or u["worker"].get("error") for u in per_rank if not u["exact"]
                    ],
                    "peak_extra": max(u["peak_extra"] for u in per_rank),
                    "leftover": max(u["leftover"] for u in per_rank),
                    "timings": per_rank[0].get("timings", {}),
                    "run_s": max(u["worker"].get("run_s", 0.0) for u in per_rank),
                }
            )
        s[key] = runs
    times = [u["seconds"] for u in s["updates"]]
    if times:
        s["best_s"] = min(times)
        s["median_s"] = statistics.median(times)
        s["gbps"] = s["checkpoint_bytes"] / s["best_s"] / 1e9
        s["of_ceiling"] = s["floor_s"] / s["best_s"]
        s["peak_extra"] = max(u["peak_extra"] for u in s["updates"])
        s["leftover"] = max(u["leftover"] for u in s["updates"])
    s["exact"] = all(u["exact"] for u in s["updates"] + s["warmup"]) and bool(s["updates"])
    if "soak" in first:
        soak = [r["soak"] for r in ranks]
        s["soak"] = {
            "n": first["soak"]["n"],
            "exact": all(x["exact"] for x in soak),
            "seconds_max": max((max(x["seconds"]) for x in soak if x["seconds"]), default=0.0),
            "device_growth": max(
                x["after"]["device_used"] - x["before"]["device_used"] for x in soak
            ),
            "ps_rss_growth": max(x["after"]["ps_rss"] - x["before"]["ps_rss"] for x in soak),
            "shm_growth": max(x["after"]["shm_used"] - x["before"]["shm_used"] for x in soak),
            "worker_rss_growth": max(
                (x["worker_rss"][-1] - x["worker_rss"][0] for x in soak if x["worker_rss"]),
                default=0,
            ),
        }
        s["exact"] = s["exact"] and s["soak"]["exact"]
    return s


def summarize(records: dict) -> dict:
    ours, up = _side(records.get("ours")), _side(records.get("upstream"))
    out: dict = {"ours": ours, "upstream": up, "ours_exact": bool(ours and ours["exact"])}
    if ours and up and "best_s" in ours and "best_s" in up:
        out["speedup"] = up["best_s"] / ours["best_s"]
    if ours and "best_s" in ours and records.get("mode") == "gpu":
        slot = max((u["timings"].get("slot_bytes", 0) for u in ours["updates"]), default=0)
        mem_limit = 2 * slot + GiB
        t = {}
        if records.get("gpus") == 1:
            if records.get("workload", "dense") == "dense":
                t["update <= 0.37 s (1 GPU)"] = ours["best_s"] <= TARGET_1GPU_S
            t[">= 85% of the H2D ceiling"] = ours["of_ceiling"] >= TARGET_CEILING
        if up and "best_s" in up:
            t["not slower than upstream"] = ours["best_s"] <= up["best_s"]
        if records.get("workload") == "moe":
            named = ours["register"].get("named")
            if named:
                t[">= 10 GB/s register named tensors"] = named["gbps"] >= TARGET_REGISTER_GBPS
            warm = ours["register"].get("named_warm")
            if warm:
                t[">= 10 GB/s register named tensors, host pool reused"] = (
                    warm["gbps"] >= TARGET_REGISTER_GBPS
                )
            if "gather_s" in ours:
                t["gather_metas < 1 s"] = ours["gather_s"] < 1.0
            best = min(ours["updates"], key=lambda u: u["seconds"])
            overhead = sum(best["timings"].get(k, 0.0) for k in ("prepare", "handshake", "finish"))
            t["host overhead (prepare + handshake + finish) < 50 ms"] = overhead < 0.050
        files = ours["register"].get("files_in_place") or ours["register"].get("files_read")
        if files:
            t[">= 10 GB/s register from /dev/shm"] = files["gbps"] >= TARGET_REGISTER_GBPS
        t[f"peak extra <= 2 x bucket + 1 GiB ({mem_limit / GiB:.2f} GiB)"] = (
            ours["peak_extra"] <= mem_limit
        )
        t["device memory returned after each update (< 64 MiB left)"] = ours["leftover"] < 64 * MiB
        if "soak" in ours:
            sk = ours["soak"]
            t[f"{sk['n']} more updates: device and host memory flat"] = (
                sk["device_growth"] < 64 * MiB
                and sk["ps_rss_growth"] < 256 * MiB
                and sk["shm_growth"] < 64 * MiB
                and sk["worker_rss_growth"] < 256 * MiB
            )
        out["targets"] = t
    return out


def _fmt_s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _reg(r: dict | None) -> str:
    return "n/a" if not r else f"{r['seconds']:.2f} s ({r['gbps']:.1f} GB/s)"


def table(records: dict) -> str:
    s = records["summary"]
    ours, up = s["ours"] or {}, s["upstream"] or {}
    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, a: str, b: str = "", ratio: str = "") -> None:
        rows.append((name, a, b, ratio))

    row(
        "device",
        str(ours.get("device", "n/a")),
        str(up.get("device", records.get("upstream_skipped", "n/a"))),
    )
    label = (
        "H2D ceiling, GB/s (min over ranks)" if records["mode"] == "gpu" else "memcpy ceiling, GB/s"
    )
    row(label, f"{ours.get('h2d_gbps', 0):.1f}", f"{up['h2d_gbps']:.1f}" if up else "")
    row(
        "checkpoint GB / floor s (own share / ceiling)",
        f"{ours.get('checkpoint_bytes', 0) / 1e9:.2f} / {_fmt_s(ours.get('floor_s'))}",
    )
    reg_o, reg_u = ours.get("register", {}), up.get("register", {})
    ratio = ""
    if reg_o.get("named") and reg_u.get("named"):
        ratio = f"{reg_u['named']['seconds'] / reg_o['named']['seconds']:.1f}x faster"
    row("register named tensors", _reg(reg_o.get("named")), _reg(reg_u.get("named")), ratio)
    row("register files in /dev/shm (pinned in place)", _reg(reg_o.get("files_in_place")))
    row("register files read into pinned memory", _reg(reg_o.get("files_read")))
    row("register named tensors again (host pool reused)", _reg(reg_o.get("named_warm")))
    row("register files read again (host pool reused)", _reg(reg_o.get("files_read_warm")))
    if "gather_s" in ours:
        row(
            "gather_metas s",
            f"{ours['gather_s']:.3f}",
            f"{up['gather_s']:.3f}" if "gather_s" in up else "",
        )
    row(
        "warm-up update s",
        ", ".join(_fmt_s(u["seconds"]) for u in ours.get("warmup", [])),
        ", ".join(_fmt_s(u["seconds"]) for u in up.get("warmup", [])),
    )
    row(
        "update s (each run)",
        " / ".join(_fmt_s(u["seconds"]) for u in ours.get("updates", [])),
        " / ".join(_fmt_s(u["seconds"]) for u in up.get("updates", [])),
    )
    sp = s.get("speedup")
    row(
        "update s (best)",
        _fmt_s(ours.get("best_s")),
        _fmt_s(up.get("best_s")),
        f"{sp:.2f}x faster" if sp else "",
    )
    row(
        "update GB/s (checkpoint bytes / best)",
        f"{ours.get('gbps', 0):.1f}",
        f"{up['gbps']:.1f}" if up.get("gbps") else "",
    )
    row(
        "share of the H2D ceiling (floor / best)",
        f"{100 * ours.get('of_ceiling', 0):.0f}%",
        f"{100 * up['of_ceiling']:.0f}%" if up.get("of_ceiling") else "",
    )
    row(
        "peak extra device memory, GiB",
        f"{ours.get('peak_extra', 0) / GiB:.2f}",
        f"{up['peak_extra'] / GiB:.2f}" if up.get("peak_extra") is not None else "",
    )
    row(
        "left after the update, MiB",
        f"{ours.get('leftover', 0) / MiB:.0f}",
        f"{up['leftover'] / MiB:.0f}" if up.get("leftover") is not None else "",
    )
    row(
        "every byte exact (all runs)",
        str(ours.get("exact", False)),
        str(up.get("exact", "n/a")) if up else "",
    )
    best = min(ours.get("updates", []), key=lambda u: u["seconds"], default=None)
    best_up = min(up.get("updates", []), key=lambda u: u["seconds"], default=None)
    if best:
        row(
            "worker's time inside run (best update), s",
            f"{best.get('run_s', 0.0):.3f}",
            f"{best_up.get('run_s', 0.0):.3f}" if best_up else "",
        )
    if best and best["timings"]:
        t = best["timings"]
        phases = ", ".join(
            f"{k} {t[k]:.3f}" for k in ("prepare", "handshake", "buckets", "finish") if k in t
        )
        row(
            "our best update by phase, s",
            phases,
            f"{t.get('buckets_n', '?')} buckets of <= {t.get('slot_bytes', 0) / MiB:.0f} MiB",
        )
    if "soak" in ours:
        sk = ours["soak"]
        row(
            f"soak: {sk['n']} more updates (growth)",
            f"device {sk['device_growth'] / MiB:.0f} MiB, PS RSS {sk['ps_rss_growth'] / MiB:.0f} MiB, shm {sk['shm_growth'] / MiB:.0f} MiB, worker RSS {sk['worker_rss_growth'] / MiB:.0f} MiB",
            f"max {sk['seconds_max']:.3f} s, exact {sk['exact']}",
        )
    head = ("", "ours", "upstream checkpoint-engine 0.4.2", "ratio")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = [
        f"{records['mode'].upper()} x{records['gpus']}, {records.get('workload', 'dense')} "
        f"workload, {records['gib']} GiB, {records.get('tensors', '?')} tensors, worker copy "
        f"{records.get('worker_copy', 'tensor')}, {records['date']}: {records['command']}",
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    for name, ok in s.get("targets", {}).items():
        lines.append(f"target {'PASS' if ok else 'FAIL'}: {name}")
    if not s["ours_exact"]:
        lines.append("ours: NOT every byte exact (see the JSON's errors)")
    return "\n".join(lines)
