"""End to end on two torchrun "nodes" (issue 17, part 4): `torchrun --nnodes 2 --node-rank 0|1`
with a c10d rendezvous on loopback, 2 CPU ranks per node (gloo), one reference server per node
(`--tp 2`, dummy weights waiting for an update), each node's updater pointed at its own server.

What makes them two nodes here: each node (its server and its torchrun, with every process they
start) runs in namespaces of its own (`unshare --mount --uts`, torchrun joining the server's with
`nsenter`): its own hostname (so `CPU-<host>-<index>` device keys differ), its own /dev/shm
(IPC buffers) and its own socket directory (a private tmpfs at the same path on both nodes),
so a file written on one node is invisible on the other, as on two hosts. Where the kernel
refuses namespaces, each node gets its own CKPT_ENGINE_HOSTNAME / CKPT_ENGINE_SHM_DIR /
CKPT_ENGINE_SOCKET_DIR instead (distinct names, but the files stay visible to both). The network
(loopback) and the filesystem holding the checkpoint and the metas file are shared, as a shared
filesystem would be. c10d orders the nodes' ranks as it likes: nothing here assumes which node
gets ranks 0-1.

1. broadcast: both nodes register a share of checkpoint A and push it; both servers serve A
   (checksums of the files, transformers' greedy tokens);
2. P2P: job A (2 nodes) registers checkpoint B and serves its host memory; job B (2 new nodes'
   worth of ranks, in the same node namespaces) pulls every bucket from A's owners on both nodes
   and fills both servers with B.
Every process has a hard deadline; process groups are killed at the end.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from safetensors.torch import load_file
from workers_testutil import (
    KEY,
    NEW_TOKENS,
    PROMPT,
    REPO,
    free_port,
    hf_greedy,
    make_hf_model,
    poll,
    save_checkpoint,
    start_server,
    stop_group,
    wait_until_up,
)

from workers.models.weights import tensor_digest

pytestmark = pytest.mark.slow

NODES = 2
PER_NODE = 2  # ranks per node = the TP size of each node's server
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
UPDATER_DEADLINE_S = 240


def node_entry(name: str, sockets: Path) -> list[str]:
    """The command prefix that starts a node: new mount and UTS namespaces, a private tmpfs on
    /dev/shm and on `sockets` (the same path on every node, different files), hostname `name`,
    then exec the rest of the command line."""
    setup = (
        f"mount -t tmpfs -o mode=1777 shm /dev/shm && mount -t tmpfs -o mode=0700 s {sockets} "
        '&& hostname "$0" && exec "$@"'
    )
    return ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", setup, name]


@functools.cache
def namespaces_work() -> bool:
    """Whether this process may start nodes with `node_entry` (root or CAP_SYS_ADMIN) and join
    them with nsenter."""
    if shutil.which("nsenter") is None:
        return False
    with tempfile.TemporaryDirectory(prefix="cemn") as tmp:
        try:
            probe = subprocess.run(
                [*node_entry("probe", Path(tmp)), "true"], capture_output=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
    return probe.returncode == 0


def node_env(name: str, short_tmp: Path) -> dict:
    """The node's environment; socket paths stay under 108 bytes (hence `short_tmp`)."""
    env = {"GLOO_SOCKET_IFNAME": "lo"}
    if namespaces_work():  # one mount point; each node mounts its own tmpfs there
        dirs = {"CKPT_ENGINE_SOCKET_DIR": short_tmp / "sockets"}
    else:  # distinct names on one host instead of private mounts
        env["CKPT_ENGINE_HOSTNAME"] = name
        dirs = {
            "CKPT_ENGINE_SOCKET_DIR": short_tmp / f"{name}-s",
            "CKPT_ENGINE_SHM_DIR": short_tmp / f"{name}-shm",
        }
    for key, path in dirs.items():
        path.mkdir(exist_ok=True)
        env[key] = str(path)
    return env


def file_digests(path: Path) -> dict:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update({n: tensor_digest(t) for n, t in load_file(f).items()})
    return tensors


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for name, seed in (("A", 11), ("B", 12)):
        model = make_hf_model("qwen3", seed=seed)
        path = save_checkpoint(model, tmp_path_factory.mktemp(f"mn-{name}"), tokenizer=True)
        out[name] = (path, model, file_digests(path))
    return out


@pytest.fixture(scope="module")
def nodes(ckpts, tmp_path_factory):
    """[{"name", "server", "env"}] for node0 and node1."""
    tmp = tmp_path_factory.mktemp("multinode")
    short_tmp = Path(tempfile.mkdtemp(prefix="cemn"))
    out = []
    try:
        for k in range(NODES):
            name = f"node{k}"
            env = node_env(name, short_tmp)
            args = ["--tp", str(PER_NODE), "--device", "cpu", "--dtype", "float32"]
            args += ["--api-key", "secret", "--load-format", "dummy", "--wait-for-initial-weights"]
            server = start_server(
                ckpts["A"][0], *args, log=tmp / f"{name}-server.log", env=env,
                prefix=node_entry(name, short_tmp / "sockets") if namespaces_work() else None,
            )  # fmt: skip
            out.append({"name": name, "server": server, "env": env, "tmp": tmp})
        for node in out:
            wait_until_up(node["server"], deadline_s=180)
        yield out
    finally:
        for node in out:
            node["server"].stop()
        shutil.rmtree(short_tmp, ignore_errors=True)


def start_job(nodes, rdzv_port: int, *args: str, log_name: str) -> list[subprocess.Popen]:
    """One torchrun per node (`--nnodes 2 --node-rank k`, c10d on 127.0.0.1), in the node's
    namespaces, its updater pointed at the node's server."""
    procs = []
    for k, node in enumerate(nodes):
        cmd = [TORCHRUN, "--nnodes", str(NODES), "--node-rank", str(k)]
        cmd += ["--nproc-per-node", str(PER_NODE), "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", f"127.0.0.1:{rdzv_port}", "--rdzv-id", log_name]
        # node0 hosts the rendezvous store; ranks reach rank 0 at 127.0.0.1 (not a hostname)
        cmd += ["--rdzv-conf", f"is_host={int(k == 0)}", "--local-addr", "127.0.0.1"]
        cmd += ["examples/update.py", "--endpoint", node["server"].url, "--device", "cpu"]
        cmd += ["--inference-parallel-size", str(PER_NODE), "--api-key", "secret"]
        cmd += ["--timeout", "120", *args]
        if namespaces_work():  # join the namespaces of the node's server
            target = ["--target", str(node["server"].proc.pid), f"--wd={REPO}"]
            cmd = ["nsenter", *target, "--mount", "--uts", *cmd]
        log = open(node["tmp"] / f"{log_name}-{node['name']}.log", "wb")  # noqa: SIM115
        with log:
            procs.append(
                subprocess.Popen(
                    cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, env={**os.environ, **node["env"]},
                )
            )  # fmt: skip
    return procs


def job_output(nodes, log_name: str) -> str:
    return "\n".join(
        f"--- {n['name']}:\n"
        + (n["tmp"] / f"{log_name}-{n['name']}.log").read_text(errors="replace")
        for n in nodes
    )


def wait_job(procs, nodes, log_name: str) -> str:
    try:
        for proc in procs:
            proc.wait(timeout=UPDATER_DEADLINE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{log_name} not done in {UPDATER_DEADLINE_S} s:\n{job_output(nodes, log_name)}"
        )
    finally:
        for proc in procs:
            stop_group(proc)
    out = job_output(nodes, log_name)
    assert [p.returncode for p in procs] == [0] * NODES, out
    return out


def check_serves(nodes, ckpt) -> None:
    _, hf, digests = ckpt
    want = hf_greedy(hf, PROMPT, NEW_TOKENS)[0]
    for node in nodes:
        server = node["server"]
        info = server.get("/weights_info", headers=KEY).json()
        assert info["status"] == "ready" and info["tensors"] == digests, node["name"]
        body = {"input_ids": PROMPT, "max_new_tokens": NEW_TOKENS}
        body["sampling_params"] = {"ignore_eos": True}
        assert server.post("/generate", body).json()["output_ids"] == want, node["name"]


def test_broadcast_over_two_nodes(nodes, ckpts):
    args = ["--checkpoint-path", str(ckpts["A"][0])]
    procs = start_job(nodes, free_port(), *args, log_name="broadcast")
    out = wait_job(procs, nodes, "broadcast")
    assert "over 4 cpu ranks" in out
    for k in range(NODES):  # each node's ranks on its own device keys (local rank, own host)
        assert f"on CPU-node{k}-0" in out and f"on CPU-node{k}-1" in out
    check_serves(nodes, ckpts["A"])


def test_p2p_join_over_two_nodes(nodes, ckpts):
    metas = nodes[0]["tmp"] / "metas-B.json"
    owners = start_job(
        nodes, free_port(), "--checkpoint-path", str(ckpts["B"][0]),
        "--save-metas-file", str(metas), "--sleep-time", "600", log_name="owners",
    )  # fmt: skip
    try:
        poll(
            lambda: metas.exists() or any(p.poll() is not None for p in owners),
            180,
            "the owners' metas file",
        )
        assert all(p.poll() is None for p in owners), job_output(nodes, "owners")
        joiners = start_job(
            nodes, free_port(), "--load-metas-file", str(metas), "--update-method", "p2p",
            log_name="joiners",
        )  # fmt: skip
        out = wait_job(joiners, nodes, "joiners")
    finally:
        for proc in owners:
            stop_group(proc)
    assert "over 4 cpu ranks" in out
    check_serves(nodes, ckpts["B"])
