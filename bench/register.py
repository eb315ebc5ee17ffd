"""Register probe: how fast can one process make 17.4 GB of checkpoint files pinned host memory?

Issue 6's register target (>= 10 GB/s from /dev/shm or page cache) is bounded by pinning, not by
reading. This probe times, on one GPU, the ways a rank can end up with the workload's bytes in
pinned memory, each phase apart, so the choice in `ckpt_engine.host_memory` rests on numbers:

- ``in_place``: map each /dev/shm file shared and cudaHostRegister it (what `register(files=)`
  does for files already in /dev/shm): no copy, 4 KiB tmpfs pages.
- ``in_place_populated``: the same, the page tables filled first (MADV_POPULATE_WRITE, in
  parallel) so that pinning only walks them.
- ``anon_4k`` / ``anon_thp``: private anonymous memory (4 KiB pages, or transparent huge pages
  with MADV_HUGEPAGE), populated in parallel, pinned, then the files read into it with parallel
  preads (the path of files that are not in /dev/shm, from the page cache).
- ``ours_in_place`` / ``ours_anonymous`` (``_4k``: without huge pages) / ``ours_shm``: what
  `ckpt_engine.host_memory` does
  (`map_in_place` or `allocate`, then `pin_all`, then `read_parallel`), to check that the
  library gets what the probe found.

Pinning goes through torch's cudart binding or, with ``--pin ctypes``, through the process's
libcudart via ctypes (which surely releases the GIL), to tell a lock in the binding from one in
the driver. Each variant runs with 1 and with ``--threads`` threads.

GPU:   python3 bench/register.py --gib 16 --threads 16
CPU:   python3 bench/register.py --gib 1 --pin none   (populate and read only: no pinning)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.workload import spec_for  # noqa: E402

MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
HUGE = 2 << 20


def madvise(addr: int, n: int, advice: int) -> None:
    if _libc.madvise(ctypes.c_void_p(addr), n, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({advice}) failed: {os.strerror(err)}")


def populate(ranges, pool: ThreadPoolExecutor, chunk: int = 64 << 20) -> None:
    futs = [
        pool.submit(madvise, addr + s, min(chunk, n - s), MADV_POPULATE_WRITE)
        for addr, n in ranges
        for s in range(0, n, chunk)
    ]
    for f in futs:
        f.result()


class Pinner:
    def __init__(self, how: str) -> None:
        self.how = how
        if how == "ctypes":
            maps = Path("/proc/self/maps").read_text().splitlines()
            path = next(
                ln.split()[-1] for ln in maps if "libcudart" in ln and ln.split()[-1][:1] == "/"
            )
            self.lib = ctypes.CDLL(path)
            self.lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            self.lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]

    def pin(self, addr: int, n: int) -> None:
        if self.how == "none":
            return
        torch.cuda.set_device(0)
        if self.how == "ctypes":
            code = self.lib.cudaHostRegister(ctypes.c_void_p(addr), n, 0)
        else:
            code = int(torch.cuda.cudart().cudaHostRegister(addr, n, 0))
        if code != 0:
            raise OSError(f"cudaHostRegister failed: {code}")

    def unpin(self, addr: int) -> None:
        if self.how == "none":
            return
        if self.how == "ctypes":
            self.lib.cudaHostUnregister(ctypes.c_void_p(addr))
        else:
            torch.cuda.cudart().cudaHostUnregister(addr)


def pmap(pool, fn, items):
    return [f.result() for f in [pool.submit(fn, x) for x in items]]


def write_files(d: Path, sizes: list[int]) -> list[Path]:
    paths = []
    for i, n in enumerate(sizes):
        p = d / f"probe-{i:03d}.bin"
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.posix_fallocate(fd, 0, n)
        os.pwrite(fd, os.urandom(4096), 0)
        os.close(fd)
        paths.append(p)
    return paths


def run_in_place(paths, threads, pinner, populated: bool) -> dict:
    pool = ThreadPoolExecutor(threads)
    t0 = time.perf_counter()
    maps = pmap(
        pool,
        lambda p: torch.from_file(str(p), shared=True, size=p.stat().st_size, dtype=torch.uint8),
        paths,
    )
    t1 = time.perf_counter()
    if populated:
        pmap(pool, lambda t: madvise(t.data_ptr(), t.numel(), MADV_POPULATE_WRITE), maps)
    t2 = time.perf_counter()
    pmap(pool, lambda t: pinner.pin(t.data_ptr(), t.numel()), maps)
    t3 = time.perf_counter()
    check_h2d(maps)
    pmap(pool, lambda t: pinner.unpin(t.data_ptr()), maps)
    del maps
    pool.shutdown()
    return {"map": t1 - t0, "populate": t2 - t1, "pin": t3 - t2, "read": 0.0, "total": t3 - t0}


def run_anon(paths, threads, pinner, thp: bool, whole: bool) -> dict:
    pool = ThreadPoolExecutor(threads)
    sizes = [p.stat().st_size for p in paths]
    prot, flags = 0x1 | 0x2, 0x02 | 0x20  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS

    t0 = time.perf_counter()
    regions = []  # (raw addr, raw len, aligned addr, n)
    for n in [sum(sizes)] if whole else sizes:
        raw = n + HUGE
        addr = _libc.mmap(None, raw, prot, flags, -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError("mmap failed")
        aligned = (addr + HUGE - 1) // HUGE * HUGE
        if thp:
            madvise(aligned, n, MADV_HUGEPAGE)
        regions.append((addr, raw, aligned, n))
    populate([(a, n) for _, _, a, n in regions], pool)
    t1 = time.perf_counter()
    pmap(pool, lambda r: pinner.pin(r[2], r[3]), regions)
    t2 = time.perf_counter()
    dests = []
    if whole:
        base, off = regions[0][2], 0
        for n in sizes:
            dests.append(base + off)
            off += n
    else:
        dests = [r[2] for r in regions]
    chunk = 64 << 20

    def read(job):
        path, dest, start, n = job
        fd = os.open(path, os.O_RDONLY)
        try:
            view = (ctypes.c_uint8 * n).from_address(dest + start)
            got = os.preadv(fd, [view], start)
            assert got == n, (got, n)
        finally:
            os.close(fd)

    jobs = [
        (p, d, s, min(chunk, n - s))
        for p, d, n in zip(paths, dests, sizes)
        for s in range(0, n, chunk)
    ]
    pmap(pool, read, jobs)
    t3 = time.perf_counter()
    tensors = [
        torch.frombuffer((ctypes.c_uint8 * n).from_address(d), dtype=torch.uint8)
        for d, n in zip(dests, sizes)
    ]
    check_h2d(tensors)
    del tensors
    pmap(pool, lambda r: pinner.unpin(r[2]), regions)
    for addr, raw, _, _ in regions:
        _libc.munmap(ctypes.c_void_p(addr), raw)
    pool.shutdown()
    return {"map": 0.0, "populate": t1 - t0, "pin": t2 - t1, "read": t3 - t2, "total": t3 - t0}


def run_ours(paths, threads, kind: str) -> dict:
    from ckpt_engine import host_memory
    from ckpt_engine.safetensors_io import ReadJob, read_parallel

    host_memory.HUGE_PAGES = not kind.endswith("_4k")
    kind = kind.removesuffix("_4k")

    t0 = time.perf_counter()
    if kind == "in_place":
        bufs = [host_memory.map_in_place(str(p), pin=False) for p in paths]
    else:
        with ThreadPoolExecutor(threads) as pool:
            bufs = pmap(
                pool,
                lambda p: host_memory.allocate(
                    p.stat().st_size, kind=kind, shm_dir="/dev/shm", label="probe", pin=False
                ),
                paths,
            )
    t1 = time.perf_counter()
    huge0 = anon_huge_bytes()
    populate_s, _ = host_memory.pin_all(bufs, threads=threads)
    t2 = time.perf_counter()
    huge = anon_huge_bytes() - huge0
    if kind != "in_place":
        read_parallel(
            [ReadJob(str(p), 0, b.memoryview()) for p, b in zip(paths, bufs)], threads=threads
        )
    t3 = time.perf_counter()
    check_h2d([b.tensor for b in bufs])
    for b in bufs:
        b.close()
    print(f"    ours {kind}: transparent huge pages {huge / 1e9:.2f} GB", flush=True)
    return {
        "map": t1 - t0,
        "populate": populate_s,
        "pin": t2 - t1 - populate_s,
        "read": t3 - t2,
        "total": t3 - t0,
    }


def anon_huge_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def check_h2d(tensors) -> None:
    """The memory is really pinned: an async copy of the largest 1 GiB at full speed."""
    check_h2d.last = 0.0
    if not torch.cuda.is_available():
        return
    src = max(tensors, key=lambda t: t.numel())[: 1 << 30]
    dst = torch.empty(src.numel(), dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    check_h2d.last = 3 * src.numel() / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=16)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument(
        "--variants",
        default="in_place,in_place_populated,anon_4k,anon_thp,"
        "anon_thp_whole,ours_in_place,ours_anonymous,ours_shm",
    )
    ap.add_argument("--pin", default="torch,ctypes")
    ap.add_argument("--rounds", type=int, default=1, help="run every variant this many times")
    a = ap.parse_args()
    if a.pin != "none":
        if not torch.cuda.is_available():
            sys.exit("register probe: pinning needs CUDA (use --pin none on CPU)")
        torch.cuda.init()
    print("kernel", platform.release(), "cpus", os.cpu_count(), "torch", torch.__version__)
    for f in ("enabled", "shmem_enabled", "defrag"):
        p = Path("/sys/kernel/mm/transparent_hugepage") / f
        print(f"thp {f}:", p.read_text().strip() if p.exists() else "n/a")
    mounts = Path("/proc/mounts").read_text().splitlines()
    print("shm mount:", [ln for ln in mounts if " /dev/shm " in ln])
    # one file per layer, as bench/run.py writes them
    spec = spec_for(a.gib)
    sizes = []
    for k in range(0, len(spec), 6):
        sizes.append(sum(torch.Size(s).numel() * 2 for _, s in spec[k : k + 6]))
    total = sum(sizes)
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="ckpt-engine-probe-") as d:
        t = time.perf_counter()
        paths = write_files(Path(d), sizes)
        print(
            f"{len(paths)} files, {total / 1e9:.2f} GB in {d}, written in "
            f"{time.perf_counter() - t:.1f} s"
        )
        rows = []
        for how in [h for _ in range(a.rounds) for h in a.pin.split(",")]:
            pinner = Pinner(how)
            for v in a.variants.split(","):
                for threads in sorted({1, a.threads}):
                    if (v.startswith("anon") or v.startswith("ours")) and threads == 1:
                        continue  # 1-thread reads are not a candidate
                    if v.startswith("ours"):
                        if how != "torch":
                            continue  # the library pins through torch's binding
                        r = run_ours(paths, threads, v.removeprefix("ours_"))
                    elif v == "in_place":
                        r = run_in_place(paths, threads, pinner, populated=False)
                    elif v == "in_place_populated":
                        r = run_in_place(paths, threads, pinner, populated=True)
                    else:
                        r = run_anon(
                            paths, threads, pinner, thp="thp" in v, whole=v.endswith("whole")
                        )
                    r.update(variant=v, pin_via=how, threads=threads, h2d=check_h2d.last)
                    rows.append(r)
                    print(
                        f"  {v:20s} {how:6s} t={threads:2d}: total {r['total']:.2f} s "
                        f"({total / 1e9 / r['total']:.1f} GB/s) populate {r['populate']:.2f} "
                        f"pin {r['pin']:.2f} ({total / 1e9 / max(r['pin'], 1e-9):.1f} GB/s) "
                        f"read {r['read']:.2f} h2d {r['h2d']:.1f} GB/s",
                        flush=True,
                    )
    print()
    print(
        "| variant | pin via | threads | total s | GB/s | populate s | pin s | read s | H2D GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['pin_via']} | {r['threads']} | {r['total']:.2f} | "
            f"{total / 1e9 / r['total']:.1f} | {r['populate']:.2f} | {r['pin']:.2f} | "
            f"{r['read']:.2f} | {r['h2d']:.1f} |"
        )


if __name__ == "__main__":
    main()
