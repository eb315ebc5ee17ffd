"""The benchmark workloads, as pure functions.

``dense`` (the comparison workload, ../shared/bench/anchor_ckpt_engine.py): a bf16 decoder
checkpoint: per layer qkv 6144x4096, o 4096x4096, gate_up 24576x4096, down 4096x12288 and two 4096
norms, layers added until the total reaches `gib` GiB (16 GiB gives 270 tensors, 17.37 GB).

``llama3-8b`` (issue 18's step target): the tensors of Meta-Llama-3-8B (291 tensors, 16.06 GB:
embeddings and lm_head 128256x4096, per layer q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096,
down 4096x14336, two norms; the final norm); ``gib`` is ignored.

``moe`` (many tensors, issue 17): a bf16 mixture-of-experts decoder whose experts are separate
checkpoint tensors, as in DeepSeek-V3 / Qwen3-MoE checkpoints (`moe_spec_for`).

Tensor i holds `randn` from a generator seeded with i, so every process
can rebuild any tensor (and its expected shard) without exchanging it. Each torchrun rank owns the
tensors with `i % world == rank`; each colocated worker keeps the row shard `shard(t, rank, world)`.
"""

from __future__ import annotations

import torch

_PER_LAYER = (
    ("qkv", (6144, 4096)),
    ("o", (4096, 4096)),
    ("gate_up", (24576, 4096)),
    ("down", (4096, 12288)),
    ("ln1", (4096,)),
    ("ln2", (4096,)),
)


def spec_for(gib: float, shrink: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the workload's tensors, in order, for a checkpoint of `gib` GiB.

    `shrink` > 1 divides every dimension (small tensors for CPU smoke tests)."""
    out: list[tuple[str, tuple[int, ...]]] = []
    total, layer = 0, 0
    while total < gib * (1 << 30):
        for name, full in _PER_LAYER:
            shape = tuple(max(1, d // shrink) for d in full)
            out.append((f"layers.{layer}.{name}", shape))
            total += torch.Size(shape).numel() * 2
        layer += 1
    return out


MOE_HIDDEN = 2048
MOE_EXPERTS = 256


def moe_spec_for(
    gib: float, tensors: int, shrink: int = 1, experts: int = MOE_EXPERTS
) -> list[tuple[str, tuple[int, ...]]]:
    """The ``moe`` workload: at least ``tensors`` tensors and at least ``gib`` GiB (before
    ``shrink``).

    Per layer, hidden size H = 2048: attention qkv (3H, H) and o (H, H), two norms (H,), the
    router (E, H), and E = ``experts`` experts of gate (I, H), up (I, H), down (H, I) each: 3E + 5
    tensors. Layers: enough for ``tensors``; the expert size I (a multiple of 8, at least 8):
    enough for ``gib``. 16 GiB, 50,000 tensors: 65 layers of 256 experts, I = 80: 50,245 tensors
    (325 of them attention, norms and routers), 18.61 GB; 16 GiB, 150,000 tensors: 195 layers,
    I = 24: 150,735 tensors, 21.47 GB (the fixed attention part is a quarter of it).
    ``shrink`` > 1 then divides every dimension (CPU runs)."""
    if tensors < 1 or experts < 1:
        raise ValueError(f"tensors ({tensors}) and experts ({experts}) must be positive")
    h = MOE_HIDDEN
    per_layer = 3 * experts + 5
    layers = -(-tensors // per_layer)
    fixed = (3 * h * h + h * h + 2 * h + experts * h) * 2
    per_expert_row = 3 * h * 2 * experts  # bytes per unit of I over the layer's experts
    rest = gib * (1 << 30) / layers - fixed
    inter = max(8, -(-int(max(rest, 0) / per_expert_row) // 8) * 8)
    while layers * (fixed + inter * per_expert_row) < gib * (1 << 30):
        inter += 8

    def dims(*shape: int) -> tuple[int, ...]:
        return tuple(max(1, d // shrink) for d in shape)

    out: list[tuple[str, tuple[int, ...]]] = []
    for layer in range(layers):
        p = f"layers.{layer}"
        out += [(f"{p}.qkv", dims(3 * h, h)), (f"{p}.o", dims(h, h))]
        out += [(f"{p}.ln1", dims(h)), (f"{p}.ln2", dims(h)), (f"{p}.router", dims(experts, h))]
        for e in range(experts):
            q = f"{p}.experts.{e}"
            out += [(f"{q}.gate", dims(inter, h)), (f"{q}.up", dims(inter, h))]
            out.append((f"{q}.down", dims(h, inter)))
    return out


LLAMA3_8B = dict(hidden=4096, kv=1024, inter=14336, vocab=128256, layers=32)


def llama3_8b_spec(shrink: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """The ``llama3-8b`` workload: Meta-Llama-3-8B's tensor names and shapes, in file order."""
    h, kv, i, v = (max(1, LLAMA3_8B[k] // shrink) for k in ("hidden", "kv", "inter", "vocab"))
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(LLAMA3_8B["layers"]):
        p = f"model.layers.{layer}"
        out += [(f"{p}.self_attn.{n}_proj.weight", (o, h)) for n, o in (("q", h), ("k", kv))]
        out += [(f"{p}.self_attn.{n}_proj.weight", (o, h)) for n, o in (("v", kv), ("o", h))]
        out += [(f"{p}.mlp.{n}_proj.weight", (i, h)) for n in ("gate", "up")]
        out.append((f"{p}.mlp.down_proj.weight", (h, i)))
        out += [(f"{p}.{n}.weight", (h,)) for n in ("input_layernorm", "post_attention_layernorm")]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


WORKLOADS = ("dense", "moe", "llama3-8b")


def workload_spec(
    kind: str, gib: float, shrink: int = 1, tensors: int = 50_000
) -> list[tuple[str, tuple[int, ...]]]:
    """The spec of workload ``kind`` (``dense``: ``tensors`` is ignored; ``llama3-8b``: ``gib``
    and ``tensors`` are)."""
    if kind == "dense":
        return spec_for(gib, shrink)
    if kind == "moe":
        return moe_spec_for(gib, tensors, shrink)
    if kind == "llama3-8b":
        return llama3_8b_spec(shrink)
    raise ValueError(f"unknown workload {kind!r}; known: {', '.join(WORKLOADS)}")


def total_bytes(spec: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(torch.Size(s).numel() * 2 for _, s in spec)


def gen(idx: int, shape: tuple[int, ...], device: str | torch.device = "cpu") -> torch.Tensor:
    """Tensor `idx` of the workload: deterministic bf16 random values."""
    g = torch.Generator(device=device).manual_seed(idx)
    return torch.randn(shape, generator=g, device=device).to(torch.bfloat16)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The tensor-parallel row shard a worker keeps (1-d tensors are replicated)."""
    if t.dim() == 1:
        return t
    rows = t.shape[0] // world
    return t.narrow(0, rank * rows, rows)


def shard_shape(shape: tuple[int, ...], world: int) -> tuple[int, ...]:
    """The shape of ``shard`` of a tensor of ``shape``."""
    return shape if len(shape) == 1 else (shape[0] // world, *shape[1:])


def owned(spec: list[tuple[str, tuple[int, ...]]], rank: int, world: int) -> list[int]:
    """Indices of the tensors rank `rank` registers (round robin, as the anchor does)."""
    return [i for i in range(len(spec)) if i % world == rank]
