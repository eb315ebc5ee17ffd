"""The broadcast-update benchmark: our ParameterServer vs upstream checkpoint-engine 0.4.2 on the
anchor's workload (bench/workload.py), in one command, same machine, same run.

GPU (the upstream wheels installed offline, see ../shared/bench/README.md; PYTHONPATH set):
    python bench/run.py --gib 16 --repeat 3 --gpus 1     # about 2-3 minutes
    python bench/run.py --gib 16 --repeat 3 --gpus 2
CPU (no target; shows the code path: gloo, shared-memory IPC buffers, no upstream):
    python bench/run.py --cpu --gpus 2     # 0.25 GiB of 1/8-size tensors, 16 MiB buckets
Training steps (issue 18; bench/steps.py): N steps, new bytes written to the files before each,
timed from files complete to the update applied; ours (one pass, and register + update on the
pool) against upstream (registering each step) and instanttensor loading the same files:
    python bench/run.py --steps 6 --gib 16     # --systems ours,ours-2pass,upstream,instanttensor
    python bench/run.py --cpu --steps 4        # ours only
    python bench/run.py --steps 6 --workload llama3-8b --systems ours,instanttensor  # 16.06 GB
Many tensors (issue 17; bench/workload.py's ``moe``: experts as separate tensors):
    python bench/run.py --workload moe --tensors 50000 --gib 16 --gpus 1
    python bench/run.py --workload moe --tensors 150000 --gib 16 --gpus 1 --worker-copy foreach
    python bench/run.py --cpu --workload moe --tensors 5000 --gib 0.02 --shrink 8

Each side runs under its own torchrun (bench/ours.py, then bench/upstream.py), one rank per GPU,
each rank with one colocated worker process that checks every byte bit-exactly. Printed last: a
table of the H2D ceiling, each system's register and update seconds, GB/s, ratios, and peak
extra device memory; the raw per-rank records go to a JSON file (``--out``; default under
$OUT when set, else bench/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import free_port  # noqa: E402
from bench.report import summarize, table  # noqa: E402
from bench.steps_report import steps_table, summarize_steps  # noqa: E402
from bench.workload import WORKLOADS, workload_spec  # noqa: E402


def launch(script: str, nproc: int, args: list[str], env: dict, log: Path, limit_s: float) -> int:
    """torchrun ``script`` with ``nproc`` ranks; output to ``log``; killed after ``limit_s``."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), str(REPO / script), *args]
    print(f"$ {' '.join(cmd)}", flush=True)
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            # SIGTERM first: torchrun's workers run in sessions of their own, so only a live
            # torchrun can end them; SIGKILL to the group if it has not gone in 30 s.
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"!! {script} ran past {limit_s:.0f} s and was killed", flush=True)
            return -9


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def collect(result_dir: Path, side: str, nproc: int) -> list[dict] | None:
    paths = [result_dir / f"{side}-rank{r}.json" for r in range(nproc)]
    if not all(p.exists() for p in paths):
        return None
    return [json.loads(p.read_text()) for p in paths]


def upstream_importable(env: dict) -> str | None:
    """None if checkpoint_engine imports in the child environment, else why not."""
    probe = subprocess.run(
        [sys.executable, "-c", "import checkpoint_engine.ps, checkpoint_engine.worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode == 0:
        return None
    return (probe.stderr.strip().splitlines() or ["import failed"])[-1]


def shm_or_tmp(env: dict, spec: list, host_memory: str) -> tuple[str, str]:
    """Host memory kind and where the workload files go: the shm directory (files pinned in
    place) when it has room for the files (plus one registered copy with ``shm`` host buffers);
    else the temp directory (files read at register) and anonymous host buffers, with a
    warning."""
    from bench.workload import total_bytes

    need = total_bytes(spec) * (2.1 if host_memory == "shm" else 1.05)
    shm_dir = env.get("CKPT_ENGINE_SHM_DIR", "/dev/shm")
    st = os.statvfs(shm_dir)
    if st.f_bavail * st.f_frsize >= need:
        return host_memory, shm_dir
    print(
        f"!! {shm_dir} has {st.f_bavail * st.f_frsize / 1e9:.1f} GB free, the run needs "
        f"{need / 1e9:.1f} GB: files go to {tempfile.gettempdir()} (read at register, no "
        "in-place pinning), host buffers are anonymous memory",
        flush=True,
    )
    return "anonymous", tempfile.gettempdir()


def probe_import(env: dict, module: str) -> str | None:
    """None if ``module`` imports in the child environment, else the last line of why not."""
    probe = subprocess.run(
        [sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True
    )
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["?"])[-1]


def run_steps(a, gib: float, env: dict, out: Path, stamp: str) -> int:
    """``--steps N``: each system in its own torchrun (one rank), one after the other."""
    systems = a.systems.split(",") if a.systems else ["ours", "ours-2pass"]
    if not a.systems and not a.cpu:
        systems += ["upstream", "instanttensor"]
    spec = workload_spec(a.workload, gib, a.shrink, a.tensors)
    from bench.workload import total_bytes

    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    data_root = env.get("CKPT_ENGINE_SHM_DIR", "/dev/shm")
    data = Path(tempfile.mkdtemp(prefix="ckpt-bench-data-", dir=data_root))
    records: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": stamp}
    records.update(gib=gib, workload=a.workload, tensors=len(spec), results={}, skipped={})
    try:
        for system in systems:
            module = {"upstream": "checkpoint_engine.ps", "instanttensor": "instanttensor"}
            if system in module and (why := probe_import(env, module[system])) is not None:
                records["skipped"][system] = f"not importable: {why}"
                print(f"!! {system} skipped: {why}", flush=True)
                continue
            args = ["--system", system, "--steps", str(a.steps), "--gib", str(gib)]
            args += ["--shrink", str(a.shrink), "--workload", a.workload]
            args += ["--tensors", str(a.tensors), "--bucket-mib", str(a.bucket_mib or 0)]
            args += ["--data-dir", str(data), "--result-dir", str(work)]
            log = work / f"{system}.log"
            # the trainer's writes (16 GB: several seconds a step) and the worker's start are
            # outside the timed part but inside this limit
            limit_s = a.limit_s if a.limit_s_set else 120 + 20 * a.steps * max(1.0, gib / 16)
            args += ["--dump-after-s", str(max(1.0, limit_s - 15))]
            rc = launch("bench/steps.py", 1, args, env, log, limit_s)
            got = collect(work, system, 1)
            records["results"][system] = got[0] if got else None
            if rc != 0 or not got or "error" in got[0]:
                lines = [
                    ln
                    for ln in tail(log, 20000).splitlines()
                    if ln.startswith(("step", system, "worker"))
                ]
                print(
                    f"!! {system} failed (exit {rc}); its progress:", *lines, sep="\n", flush=True
                )
                print(f"log tail:\n{tail(log, 12000)}", flush=True)
        results = records["results"]
        records["summary"] = {k: summarize_steps(v) for k, v in results.items() if v}
        device = next((v.get("device") for v in results.values() if v and "device" in v), "CPU")
        text = steps_table(results, total_bytes(spec), device)
        for system, why in records["skipped"].items():
            text += f"\n{system}: skipped ({why})"
        out.write_text(json.dumps(records, indent=1))
        out.with_suffix(".md").write_text(text + "\n")
        print(f"results: {out}")
        print(text)
        ours = records["summary"].get("ours", {})
        return 0 if ours.get("exact") else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--gib", type=float, default=None, help="checkpoint size (default 16; CPU 0.25)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="timed updates per system")
    ap.add_argument("--warmup", type=int, default=1, help="untimed updates first (reported)")
    ap.add_argument(
        "--soak",
        type=int,
        default=None,
        help="extra updates of ours for the memory-flatness check (default 20; CPU 3)",
    )
    ap.add_argument("--gpus", type=int, default=1, help="ranks (one per GPU; CPU: processes)")
    ap.add_argument("--cpu", action="store_true", help="CPU path: gloo, shm IPC, no upstream")
    ap.add_argument(
        "--bucket-mib", type=int, default=None, help="our bucket size (PSConfig's; CPU: 16)"
    )
    ap.add_argument(
        "--shrink", type=int, default=None, help="divide every tensor dimension (CPU: 8)"
    )
    ap.add_argument("--slots", type=int, default=0, help="our IPC slots (default: PSConfig's)")
    ap.add_argument("--workload", default="dense", choices=WORKLOADS, help="bench/workload.py")
    ap.add_argument("--tensors", type=int, default=50_000, help="moe: at least this many tensors")
    ap.add_argument(
        "--worker-copy",
        default="tensor",
        choices=("tensor", "foreach"),
        help="the workers' run: one copy per tensor (load_weights-like) or one batched "
        "torch._foreach_copy_ per bucket (both systems alike)",
    )
    ap.add_argument("--register", default="files,copy,named", help="register variants to time")
    ap.add_argument(
        "--host-memory",
        default="anonymous",
        choices=("anonymous", "shm"),
        help="our host buffers (PSConfig.host_memory; files already in /dev/shm are pinned in place "
        "either way)",
    )
    ap.add_argument("--skip-upstream", action="store_true")
    ap.add_argument(
        "--steps", type=int, default=0, help="training steps instead (bench/steps.py); N >= 1"
    )
    ap.add_argument(
        "--systems",
        default=None,
        help="--steps: comma list of ours, ours-2pass, upstream, instanttensor (default: all; "
        "CPU: ours, ours-2pass)",
    )
    ap.add_argument(
        "--limit-s",
        type=float,
        default=None,
        help="time limit of ours (upstream: 3/4 of it; default 200); --steps: of each system "
        "(default 120 s + 20 s a step per 16 GiB)",
    )
    ap.add_argument("--out", default=None, help="JSON results path (the table: same name .md)")
    ap.add_argument("--results", default=None, help="also append the table to this markdown file")
    a = ap.parse_args()
    a.limit_s_set = a.limit_s is not None
    a.limit_s = a.limit_s if a.limit_s is not None else 200
    gib = a.gib if a.gib is not None else (0.25 if a.cpu else 16)
    soak = a.soak if a.soak is not None else (3 if a.cpu or a.workload == "moe" else 20)
    mode = "cpu" if a.cpu else "gpu"
    bucket_mib = a.bucket_mib if a.bucket_mib is not None else (16 if a.cpu else 0)
    a.shrink = a.shrink if a.shrink is not None else (8 if a.cpu else 1)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (
        Path(a.out)
        if a.out
        else Path(os.environ.get("OUT") or REPO / "bench" / "results")
        / f"bench-{mode}-{a.gpus}x-{stamp}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["CKPT_ENGINE_DEVICE"] = "cpu" if a.cpu else "cuda"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.gpus)))
    if not a.cpu:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < a.gpus:
            print(
                f"error: --gpus {a.gpus} needs {a.gpus} visible GPUs; use --cpu for the CPU path",
                file=sys.stderr,
            )
            return 2
    if a.steps:
        return run_steps(a, gib, env, out.with_name(out.name.replace("bench-", "steps-")), stamp)
    spec = workload_spec(a.workload, gib, a.shrink, a.tensors)
    host_memory, data_root = shm_or_tmp(env, spec, a.host_memory)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    data = Path(tempfile.mkdtemp(prefix="ckpt-bench-data-", dir=data_root))
    started = time.time()
    records: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": stamp,
        "mode": mode,
        "gpus": a.gpus,
        "gib": gib,
        "shrink": a.shrink,
        "workload": a.workload,
        "tensors": len(spec),
        "worker_copy": a.worker_copy,
        "host_memory": host_memory,
    }
    try:
        common = ["--gib", str(gib), "--repeat", str(a.repeat), "--warmup", str(a.warmup)]
        common += ["--result-dir", str(work), "--shrink", str(a.shrink)]
        common += ["--workload", a.workload, "--tensors", str(a.tensors)]
        common += ["--worker-copy", a.worker_copy]
        ours_args = [*common, "--soak", str(soak), "--data-dir", str(data)]
        ours_args += ["--register", a.register, "--host-memory", host_memory]
        ours_args += ["--bucket-mib", str(bucket_mib), "--slots", str(a.slots)]
        rc = launch("bench/ours.py", a.gpus, ours_args, env, work / "ours.log", a.limit_s)
        records["ours"] = collect(work, "ours", a.gpus)
        if rc != 0 or records["ours"] is None:
            print(f"!! ours failed (exit {rc}); log tail:\n{tail(work / 'ours.log')}", flush=True)
        records["upstream"] = None
        if a.cpu or a.skip_upstream:
            records["upstream_skipped"] = (
                "CPU mode (upstream needs CUDA)" if a.cpu else "--skip-upstream"
            )
        elif (why := upstream_importable(env)) is not None:
            records["upstream_skipped"] = f"checkpoint_engine not importable: {why}"
            print(
                f"!! upstream skipped: {why} (install the wheels into a dir on PYTHONPATH; see ../shared/bench/README.md)",
                flush=True,
            )
        else:
            log = work / "upstream.log"
            rc = launch("bench/upstream.py", a.gpus, common, env, log, 0.75 * a.limit_s)
            records["upstream"] = collect(work, "upstream", a.gpus)
            if rc != 0 or records["upstream"] is None:
                print(
                    f"!! upstream failed (exit {rc}); log tail:\n{tail(work / 'upstream.log')}",
                    flush=True,
                )
        records["wall_s"] = time.time() - started
        records["summary"] = summarize(records)
        out.write_text(json.dumps(records, indent=1))
        for side in ("ours", "upstream"):
            if (work / f"{side}.log").exists():
                shutil.copy(work / f"{side}.log", out.with_suffix(f".{side}.log"))
        print(f"results: {out}  ({records['wall_s']:.0f} s)")
        text = table(records)
        out.with_suffix(".md").write_text(text + "\n")
        if a.results:
            with open(a.results, "a") as f:
                f.write(
                    f"\n## Broadcast update ({a.workload}), bench/run.py ({stamp})\n\n"
                    f"```\n{text}\n```\n"
                )
        print(text)
        return 0 if records["summary"]["ours_exact"] else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
