"""P2P transport benchmark: GB/s from one process's registered host memory into another's.

What it measures:
- Owner (a spawned process): one host buffer of --gib GiB filled with a known pattern, pinned
  with cudaHostRegister when CUDA is present (as a registered checkpoint is), served by the
  portable ``tcp`` transport (ckpt_engine.p2p.tcp: ZMQ/TCP, token-checked, zero-copy sends) and,
  when ``mooncake.engine`` imports and initializes, by Mooncake (protocol --mooncake-protocol,
  default tcp; rdma needs an RDMA NIC).
- Reader (this process): a staging buffer of the same size (pinned on CUDA) read whole by 1..N
  parallel readers (--streams; each its own connection, a disjoint share of the bytes), --repeat
  times: best and median GB/s (1 GB = 1e9 bytes). On CUDA also the H2D copy of the staging buffer
  into device memory (the next hop of a P2P update), timed alone.
- A column shard (what a P2P receiver of TP=2 reads of a row-parallel weight): the buffer as a
  row-major matrix of rows of 2 x --column-run bytes, the first half of every row read as one
  strided range (the tcp owner packs the runs, the reader puts them back; Mooncake reads run by
  run, or the whole span in one piece where runs are shorter than its MIN_RUN_BYTES); GB/s of
  the bytes moved (half the buffer, or the span).
- Every byte is checked against the pattern after the timed reads (outside the timing).
Loopback on one host: this is the transport's own ceiling (CPU, memcpy, syscalls), not a NIC's.

GPU machine:
    .venv/bin/python bench/p2p.py --gib 4 --streams 1,2,4,8 --results bench/RESULTS.md
CPU smoke test (64 MiB, no pinning):
    .venv/bin/python bench/p2p.py --cpu
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ckpt_engine import host_memory  # noqa: E402
from ckpt_engine.p2p.transport import ReadRange  # noqa: E402

TOKEN = "b" * 32
GiB = 1 << 30


def pattern(buf: torch.Tensor) -> None:
    """Byte i is i % 251 (a prime: no alignment hides a misplaced chunk)."""
    step = 64 << 20
    base = torch.arange(step, dtype=torch.int64)
    for start in range(0, buf.numel(), step):
        n = min(step, buf.numel() - start)
        buf[start : start + n] = ((base[:n] + start) % 251).to(torch.uint8)


def owner_main(conn, nbytes: int, pin: bool, mooncake_protocol: str | None) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    buf = host_memory.allocate(nbytes, kind="anonymous", shm_dir="/dev/shm", label="bench", pin=pin)
    pattern(buf.tensor)
    records = {}
    servers = []
    from ckpt_engine.p2p.tcp import TcpServer

    tcp = TcpServer("127.0.0.1", rank=0)
    servers.append(tcp)
    records["tcp"] = tcp.export("bench", TOKEN, [buf])
    if mooncake_protocol is not None:
        os.environ["CKPT_ENGINE_MOONCAKE_PROTOCOL"] = mooncake_protocol
        from ckpt_engine.p2p.mooncake import MooncakeTransport

        t = MooncakeTransport.shared()
        try:
            server = t.serve("127.0.0.1", 0)
            servers.append(server)
            records["mooncake"] = server.export("bench", TOKEN, [buf])
        except Exception as e:
            records["mooncake_error"] = f"{type(e).__name__}: {e}"
    conn.send(records)
    conn.recv()  # until the reader is done
    for s in servers:
        s.close()
    buf.close()


def open_reader(name: str, record: dict, timeout_s: float):
    if name == "tcp":
        from ckpt_engine.p2p.tcp import TcpReader

        return TcpReader(record, owner="bench owner", checkpoint="bench", timeout_s=timeout_s)
    from ckpt_engine.p2p.mooncake import MooncakeTransport

    t = MooncakeTransport.shared()
    t.engine("127.0.0.1")
    return t.reader(record, owner="bench owner", checkpoint="bench", timeout_s=timeout_s)


def timed_read(name: str, record: dict, staging: host_memory.HostBuffer, streams: int) -> float:
    """Seconds to read the whole buffer with ``streams`` parallel readers (connect excluded)."""
    n = staging.nbytes
    share = -(-n // streams)
    view = staging.memoryview()
    readers = [open_reader(name, record, 60.0) for _ in range(streams)]
    for r in readers:
        r.prepare([staging])
    # warm the connections (a 4 KiB read each), outside the timing
    for r in readers:
        r.read([ReadRange(0, 0, 4096, view[:4096])])
    errors: list[BaseException] = []

    def work(i: int) -> None:
        start, end = i * share, min(n, (i + 1) * share)
        try:
            if end > start:
                readers[i].read([ReadRange(0, start, end - start, view[start:end])])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for r in readers:
        r.close()
    if errors:
        raise errors[0]
    return seconds


def timed_column_read(name: str, record: dict, staging: host_memory.HostBuffer, run: int):
    """(seconds, bytes) to read the first ``run`` bytes of every ``2 * run``-byte row."""
    count = staging.nbytes // (2 * run)
    span = (count - 1) * 2 * run + run
    view = staging.memoryview()
    reader = open_reader(name, record, 60.0)
    reader.prepare([staging])
    reader.read([ReadRange(0, 0, 4096, view[:4096])])  # warm the connection
    t0 = time.perf_counter()
    moved = reader.read([ReadRange(0, 0, run, view[:span], count=count, stride=2 * run)])
    seconds = time.perf_counter() - t0
    reader.close()
    return seconds, moved


def verify_columns(staging: host_memory.HostBuffer, run: int) -> None:
    count = staging.nbytes // (2 * run)
    want = torch.empty_like(staging.tensor)
    pattern(want)
    cols = slice(0, run)
    got = staging.tensor[: count * 2 * run].view(count, 2 * run)[:, cols]
    if not torch.equal(want[: count * 2 * run].view(count, 2 * run)[:, cols], got):
        raise SystemExit("verification of the column shard failed")


def verify(staging: host_memory.HostBuffer) -> None:
    want = torch.empty_like(staging.tensor)
    pattern(want)
    if not torch.equal(want, staging.tensor):
        bad = int((want != staging.tensor).nonzero()[0])
        raise SystemExit(f"verification failed: first differing byte at {bad}")


def h2d_seconds(staging: host_memory.HostBuffer, repeat: int) -> list[float]:
    dev = torch.empty(staging.nbytes, dtype=torch.uint8, device="cuda")
    out = []
    for _ in range(repeat + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(staging.tensor, non_blocking=True)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out[1:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=4.0)
    p.add_argument("--streams", default="1,2,4")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="small CPU smoke run (64 MiB, no pinning)")
    p.add_argument("--mooncake-protocol", default="tcp", choices=("tcp", "rdma", "none"))
    p.add_argument("--results", help="append a markdown section to this file")
    p.add_argument(
        "--column-run",
        type=int,
        default=12288,
        help="bytes per row of the column shard read (12288: a TP=2 shard of a bf16 row of 12288)",
    )
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    nbytes = (64 << 20) if args.cpu else int(args.gib * GiB)
    streams = [int(s) for s in args.streams.split(",")]
    try:
        import mooncake.engine

        mooncake = args.mooncake_protocol != "none"
    except Exception as e:
        mooncake = False
        print(f"mooncake: not measured ({type(e).__name__}: {e})")

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(
        target=owner_main,
        args=(child, nbytes, cuda, args.mooncake_protocol if mooncake else None),
        daemon=True,
    )
    proc.start()
    staging = host_memory.allocate(
        nbytes, kind="anonymous", shm_dir="/dev/shm", label="bench-r", pin=cuda
    )
    rows = []
    try:
        if not conn.poll(600):
            raise SystemExit("owner did not start")
        records = conn.recv()
        if "mooncake_error" in records:
            print(f"mooncake: not measured ({records['mooncake_error']})")
        for name in [n for n in ("tcp", "mooncake") if n in records]:
            for s in streams:
                times = []
                for _ in range(args.repeat):
                    staging.tensor.zero_()
                    times.append(timed_read(name, records[name], staging, s))
                    verify(staging)
                gbs = [nbytes / t / 1e9 for t in times]
                rows.append((name, s, max(gbs), statistics.median(gbs)))
            gbs = []
            for _ in range(args.repeat):
                staging.tensor.zero_()
                seconds, moved = timed_column_read(name, records[name], staging, args.column_run)
                verify_columns(staging, args.column_run)
                gbs.append(moved / seconds / 1e9)
            what = f"{name}, column shard (runs of {args.column_run} B of rows twice that)"
            rows.append((what, 1, max(gbs), statistics.median(gbs)))
        if cuda:
            gbs = [nbytes / t / 1e9 for t in h2d_seconds(staging, args.repeat)]
            rows.append(("H2D from staging", 1, max(gbs), statistics.median(gbs)))
    finally:
        conn.send("done")
        proc.join(60)
        staging.close()
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    header = (
        f"P2P transport, loopback, {nbytes / 1e9:.2f} GB buffer, "
        f"{'pinned' if cuda else 'unpinned'} host memory, {device}, {os.cpu_count()} CPUs"
    )
    table = ["| transport | streams | best GB/s | median GB/s |", "|---|---|---|---|"]
    table += [f"| {n} | {s} | {b:.2f} | {m:.2f} |" for n, s, b, m in rows]
    print(header)
    print("\n".join(table))
    if args.results:
        with open(args.results, "a") as f:
            f.write(f"\n## P2P transport (bench/p2p.py)\n\n{header}\n\n" + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
