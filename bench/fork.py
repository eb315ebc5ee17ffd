"""Fork benchmark: cold-start a server from a running seed (GPU to GPU) vs from disk.

What it measures, honestly:
- The checkpoint is a real Llama model the reference server loads, built on the shared workload's
  shapes (bench/workload.py): per layer qkv 6144x4096 (q 4096 + k 1024 + v 1024 rows), o
  4096x4096, gate_up 24576x4096, down 4096x12288, two 4096 norms, bf16, as many layers as the
  workload has (45 for --gib 16: 17.37 GB), plus a 1024-token embedding and LM head (16.8 MB).
  Values are the workload's seeded `gen(i, shape)`.
- Disk baseline: a seed server (TP=1, GPU 0) loads it from the safetensors files: the rank's own
  load time (log) and the time from spawn to /health 200. The files were just written, so they
  are probably in the page cache (a *warm* disk); --drop-caches tries to evict them first (root).
- Fork: a client server (TP=1, GPU 1, `--load-format remote_instance`, NCCL) forks from the seed:
  the transfer time the client's loader logs (from the first tensor to the last, after the NCCL
  group is formed) and the time from spawn to /health 200 (process start, CUDA init, model build,
  manifest check, rendezvous, transfer).
- Verification (outside every timing): /weights_info sha256 of every tensor, seed vs client, and
  one /generate on both.

GPU (2 GPUs, about 3 minutes; the checkpoint is kept in --dir for the next run):
    .venv/bin/python bench/fork.py --dir /tmp/ckpt-engine-fork --results bench/RESULTS.md
CPU smoke test (tiny shapes, gloo):
    .venv/bin/python bench/fork.py --cpu --small
Another TP size on the client (`--client-tp 2`: a TP=2 client of the TP=1 seed, slice mode:
each client rank receives only the rows it keeps; `--whole-tensors`: full mode, each receives
the whole model); the table ends with the bytes moved per link (seed -> each client rank):
    .venv/bin/python bench/fork.py --cpu --small --client-tp 2 [--whole-tensors]

`--backend transfer_engine` forks one-sided through Mooncake instead (the seed started with
`--remote-instance-weight-loader-start-seed-via-transfer-engine`; protocol: RDMA where a device
is listed, else TCP): first one client, then `--clients N` at once (each reads on its own; the
table gives each one's GB/s and their aggregate). The seed's cost per client is what its ranks
do for one: two info requests (timed here, median of 5), no transfer work. `--same-gpu` puts the
clients on the seed's GPU (for a one-GPU machine: Mooncake then copies GPU memory through its
TCP protocol on one device; NCCL cannot pair two processes on one GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.harness import free_port  # noqa: E402
from bench.workload import gen, spec_for  # noqa: E402

KEY = "fork-bench"
SMALL = dict(hidden=256, intermediate=768, heads=4, kv_heads=2, head_dim=64, layers=4)


def model_shape(args) -> dict:
    if args.small:
        return SMALL
    layers = len(spec_for(args.gib)) // 6
    return dict(hidden=4096, intermediate=12288, heads=32, kv_heads=8, head_dim=128, layers=layers)


def write_checkpoint(path: Path, shape: dict, device: str) -> int:
    """config.json + one safetensors file per layer (+ index); returns the bytes of the weights."""
    from safetensors.torch import save_file

    marker = path / "bench.json"
    if marker.exists() and json.loads(marker.read_text()).get("shape") == shape:
        return json.loads(marker.read_text())["bytes"]
    path.mkdir(parents=True, exist_ok=True)
    h, inter, hd = shape["hidden"], shape["intermediate"], shape["head_dim"]
    q, kv = shape["heads"] * hd, shape["kv_heads"] * hd
    vocab = 1024
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "head_dim": hd,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    weight_map, total, idx = {}, 0, 0

    def tensor(shape_):
        nonlocal idx, total
        idx += 1
        t = gen(idx, shape_, device).cpu()
        total += t.numel() * t.element_size()
        return t

    def save(tensors: dict, file: str) -> None:
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))

    save(
        {
            "model.embed_tokens.weight": tensor((vocab, h)),
            "lm_head.weight": tensor((vocab, h)),
            "model.norm.weight": tensor((h,)),
        },
        "model-embed.safetensors",
    )
    for layer in range(shape["layers"]):
        p = f"model.layers.{layer}."
        qkv = tensor((q + 2 * kv, h))
        tensors = {
            p + "self_attn.q_proj.weight": qkv[:q].clone(),
            p + "self_attn.k_proj.weight": qkv[q : q + kv].clone(),
            p + "self_attn.v_proj.weight": qkv[q + kv :].clone(),
            p + "self_attn.o_proj.weight": tensor((h, q)),
            p + "mlp.gate_proj.weight": (gate_up := tensor((2 * inter, h)))[:inter].clone(),
            p + "mlp.up_proj.weight": gate_up[inter:].clone(),
            p + "mlp.down_proj.weight": tensor((h, inter)),
            p + "input_layernorm.weight": tensor((h,)),
            p + "post_attention_layernorm.weight": tensor((h,)),
        }
        save(tensors, f"model-{layer:05d}.safetensors")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    marker.write_text(json.dumps({"shape": shape, "bytes": total}))
    return total


class Server:
    def __init__(self, name: str, model: Path, argv: list[str], logdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logdir / f"{name}.log"
        cmd = [sys.executable, "-m", "workers.server", "--model-path", str(model)]
        cmd += ["--port", str(self.port), "--api-key", KEY, *argv]
        self.started = time.perf_counter()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_healthy(self, deadline_s: float) -> float:
        """Seconds from spawn to /health 200."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.log.name} exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            time.sleep(0.05)
        raise SystemExit(f"{self.log.name} not healthy after {deadline_s} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def seconds(self, pattern: str) -> float:
        found = re.findall(pattern, self.output())
        if not found:
            raise SystemExit(f"no {pattern!r} in {self.log}")
        return float(found[-1])

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def drop_caches() -> str:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "page cache dropped"
    except OSError as e:
        return f"page cache NOT dropped ({e.strerror}): a warm-cache disk load"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU servers and gloo (CI smoke test)")
    parser.add_argument("--small", action="store_true", help="tiny shapes instead of the workload")
    parser.add_argument("--gib", type=float, default=16.0, help="workload size (16: 17.37 GB)")
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint folder (kept)")
    parser.add_argument("--drop-caches", action="store_true", help="evict the page cache (root)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 comparison")
    parser.add_argument("--results", type=Path, default=None, help="append the table here")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--backend", default="nccl", choices=("nccl", "transfer_engine"))
    parser.add_argument("--client-tp", type=int, default=1, help="nccl/gloo: the client's TP")
    parser.add_argument(
        "--whole-tensors", action="store_true", help="client: full mode (whole tensors per rank)"
    )
    parser.add_argument("--clients", type=int, default=2, help="transfer_engine: clients at once")
    parser.add_argument("--same-gpu", action="store_true", help="transfer_engine: clients on GPU 0")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    gpus_needed = 1 if args.same_gpu else 1 + args.client_tp
    if device == "cuda" and torch.cuda.device_count() < gpus_needed:
        raise SystemExit(
            f"needs {gpus_needed} CUDA GPUs (seed on GPU 0, client on the next); or pass --cpu"
        )
    if args.backend == "transfer_engine":
        return one_sided(args, device)

    tmp = Path(tempfile.mkdtemp(prefix="ckpt-engine-fork-"))
    ckpt = args.dir if args.dir is not None else tmp / "ckpt"
    t0 = time.perf_counter()
    nbytes = write_checkpoint(ckpt, model_shape(args), "cuda" if device == "cuda" else "cpu")
    print(f"checkpoint {ckpt}: {nbytes / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s to make)")
    cache = drop_caches() if args.drop_caches else "page cache not dropped: a warm-cache disk load"
    print(cache)

    common = ["--device", device, "--tp", "1"]
    seed = Server("seed", ckpt, [*common, "--base-gpu-id", "0"], tmp)
    client = None
    try:
        disk_total = seed.wait_healthy(args.timeout)
        disk_load = seed.seconds(r"auto weights loaded on \S+ in ([\d.]+) s")
        fork = ["--device", device, "--tp", str(args.client_tp)]
        fork += ["--base-gpu-id", "0" if args.cpu else "1", "--load-format", "remote_instance"]
        fork += ["--remote-instance-weight-loader-seed-instance-ip", "127.0.0.1"]
        fork += ["--remote-instance-weight-loader-seed-instance-service-port", str(seed.port)]
        ports = json.dumps([free_port() for _ in range(args.client_tp)])
        fork += ["--remote-instance-weight-loader-send-weights-group-ports", ports]
        if args.whole_tensors:
            fork += ["--remote-instance-weight-loader-whole-tensors"]
        client = Server("client", ckpt, fork, tmp)
        fork_total = client.wait_healthy(args.timeout)
        transfer = client.seconds(r"forked [\d.]+ GB from \S+ in ([\d.]+) s")
        confirmed = client.seconds(r"the seed's answer in after ([\d.]+) s")
        sent = seed.seconds(r"fork \S+: sent \d+ bytes \(\w+ mode\) in ([\d.]+) s")
        mode, links = links_of(seed.output())
        fork_load = client.seconds(r"remote_instance weights loaded on \S+ in ([\d.]+) s")
        verified = "skipped"
        if not args.no_verify:
            auth = {"Authorization": f"Bearer {KEY}"}
            a = requests.get(seed.url + "/weights_info", headers=auth, timeout=args.timeout).json()
            b = requests.get(client.url + "/weights_info", headers=auth, timeout=args.timeout)
            b = b.json()
            if a["tensors"] != b["tensors"]:
                raise SystemExit("FAILED: the client's sha256 checksums differ from the seed's")
            body = {"input_ids": [1, 2, 3, 4], "max_new_tokens": 4}
            outs = [
                requests.post(s.url + "/generate", json=body, timeout=120).json()
                for s in (seed, client)
            ]
            if outs[0]["output_ids"] != outs[1]["output_ids"]:
                raise SystemExit("FAILED: the client generates other tokens than the seed")
            verified = f"sha256 of {len(a['tensors'])} tensors and /generate match"
    finally:
        for s in (client, seed):
            if s is not None:
                s.stop()
        if args.dir is None:
            shutil.rmtree(ckpt, ignore_errors=True)
        print(f"server logs: {tmp}")

    gb = nbytes / 1e9
    where = "CPU, gloo" if args.cpu else "GPU 0 -> GPU 1, NCCL"
    rows = [
        (f"disk -> {'CPU' if args.cpu else 'GPU 0'}: rank's load", disk_load),
        ("disk: spawn to healthy", disk_total),
        (f"fork ({where}): transfer (client: send call to last byte)", transfer),
        ("fork: seed's send (first tensor to all flushed)", sent),
        ("fork: transfer + the seed's answer (groups close in the background)", confirmed),
        ("fork: rank's load (manifest, rendezvous, transfer)", fork_load),
        ("fork: spawn to healthy", fork_total),
    ]
    lines = ["| what | bytes | seconds | GB/s |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {nbytes} | {s:.3f} | {gb / s:.2f} |" for name, s in rows]
    lines += ["", "| link | bytes moved | of the checkpoint |", "| --- | ---: | ---: |"]
    lines += [
        f"| seed rank 0 -> client rank {j} ({mode} mode) | {n} | {n / nbytes:.1%} |"
        for j, n in sorted(links.items())
    ]
    table = "\n".join(lines)
    note = f"{gb:.2f} GB, {cache}; verification: {verified}"
    print(table)
    print(note)
    if args.results is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        gpu = torch.cuda.get_device_name(0) if not args.cpu else "cpu"
        with open(args.results, "a") as f:
            f.write(f"\n## Fork vs disk ({stamp}, {gpu}, bench/fork.py)\n\n{table}\n\n{note}\n")
    return 0


def links_of(seed_log: str) -> tuple[str, dict[int, int]]:
    """The last send's mode and bytes per client rank, from the seed's log line."""
    found = re.findall(r"fork \S+: sent \d+ bytes \((\w+) mode\) in [\d.]+ s \(([^)]*)\)", seed_log)
    if not found:
        raise SystemExit("no bytes per link in the seed's log")
    mode, text = found[-1]
    links = {int(j): int(n) for j, n in re.findall(r"client rank (\d+): (\d+)", text)}
    return mode, links


def one_sided(args, device: str) -> int:
    """The transfer_engine fork: one client alone, then `--clients` at once."""
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-engine-fork-te-"))
    ckpt = args.dir if args.dir is not None else tmp / "ckpt"
    nbytes = write_checkpoint(ckpt, model_shape(args), "cuda" if device == "cuda" else "cpu")
    gb = nbytes / 1e9
    common = ["--device", device, "--tp", "1"]
    seed = Server(
        "seed",
        ckpt,
        [
            *common,
            "--base-gpu-id",
            "0",
            "--remote-instance-weight-loader-start-seed-via-transfer-engine",
        ],
        tmp,
    )
    clients: list[Server] = []
    auth = {"Authorization": f"Bearer {KEY}"}
    rows, note = [], ""
    pattern = r"forked ([\d.]+) GB one-sided \(transfer_engine\) from \S+ \(TP \d+\) in ([\d.]+) s"
    try:
        seed.wait_healthy(args.timeout)
        info_s = []
        for _ in range(5):
            t = time.perf_counter()
            r = requests.get(seed.url + "/get_remote_instance_transfer_engine_info", headers=auth)
            r.raise_for_status()
            info_s.append(time.perf_counter() - t)
        info = sorted(info_s)[2]
        gpu = "0" if (args.cpu or args.same_gpu) else "1"

        def client(name: str) -> Server:
            fork = [*common, "--base-gpu-id", gpu, "--load-format", "remote_instance"]
            fork += ["--remote-instance-weight-loader-backend", "transfer_engine"]
            fork += ["--remote-instance-weight-loader-seed-instance-ip", "127.0.0.1"]
            fork += ["--remote-instance-weight-loader-seed-instance-service-port", str(seed.port)]
            return Server(name, ckpt, fork, tmp)

        for round_, count in (("alone", 1), ("at once", args.clients)):
            batch = [client(f"client-{round_.replace(' ', '-')}-{i}") for i in range(count)]
            clients += batch
            totals = [c.wait_healthy(args.timeout) for c in batch]
            for i, c in enumerate(batch):
                found = re.findall(pattern, c.output())
                if not found:
                    raise SystemExit(f"no transfer line in {c.log}:\n{c.output()[-3000:]}")
                seconds = float(found[-1][1])
                rows.append((f"{count} client(s) {round_}, #{i}: transfer", seconds))
                rows.append((f"{count} client(s) {round_}, #{i}: spawn to healthy", totals[i]))
            if not args.no_verify:
                a = requests.get(seed.url + "/weights_info", headers=auth, timeout=args.timeout)
                for c in batch:
                    b = requests.get(c.url + "/weights_info", headers=auth, timeout=args.timeout)
                    if a.json()["tensors"] != b.json()["tensors"]:
                        raise SystemExit(f"FAILED: {c.log.name}'s sha256 differ from the seed's")
            for c in batch:
                c.stop()
        protocol = re.findall(r"mooncake transfer engine on \S+ \((\w+)\)", seed.output())
        note = (
            f"{gb:.2f} GB; Mooncake protocol {protocol[-1] if protocol else '?'}; "
            f"clients on {'cpu' if args.cpu else 'GPU ' + gpu}; the seed's cost per client: 2 info requests of "
            f"{info * 1000:.1f} ms each (median of 5), no transfer work; verification: "
            + ("skipped" if args.no_verify else "sha256 of every tensor matches the seed's")
        )
    finally:
        for s in (*clients, seed):
            s.stop()
        if args.dir is None:
            shutil.rmtree(ckpt, ignore_errors=True)
        print(f"server logs: {tmp}")
    lines = ["| what | bytes | seconds | GB/s |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {nbytes} | {s:.3f} | {gb / s:.2f} |" for name, s in rows]
    table = "\n".join(lines)
    print(table)
    print(note)
    if args.results is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        gpu_name = torch.cuda.get_device_name(0) if not args.cpu else "cpu"
        with open(args.results, "a") as f:
            f.write(
                f"\n## Fork, transfer_engine ({stamp}, {gpu_name}, bench/fork.py --backend "
                f"transfer_engine)\n\n{table}\n\n{note}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
