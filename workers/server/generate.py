"""Greedy decoding of one sequence with a KV cache (no batching, no sampling).

Every rank runs the same loop in step (each forward is collective); the logits are all-gathered,
so every rank picks the same token and rank 0's result is the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Generation:
    output_ids: list[int]
    finish_reason: str  # "stop" (a stop token was produced; it is included) or "length"
    logits: list[list[float]] | None  # per output token, the float32 logits it was picked from


@torch.inference_mode()
def greedy_generate(
    model,
    input_ids: list[int],
    *,
    max_new_tokens: int,
    stop_token_ids: list[int],
    return_logits: bool = False,
) -> Generation:
    device = model.lm_head.weight.device
    cache = model.new_cache(len(input_ids) + max_new_tokens)
    tokens = torch.tensor(input_ids, dtype=torch.long, device=device)
    logits = model(tokens, cache, 0)[-1]
    position = len(input_ids)
    stops = set(stop_token_ids)
    output, rows, finish = [], [], "length"
    for step in range(max_new_tokens):
        token = int(torch.argmax(logits).item())
        output.append(token)
        if return_logits:
            rows.append(logits.float().cpu().tolist())
        if token in stops:
            finish = "stop"
            break
        if step + 1 < max_new_tokens:
            next_input = torch.tensor([token], dtype=torch.long, device=device)
            logits = model(next_input, cache, position)[-1]
            position += 1
    return Generation(output, finish, rows if return_logits else None)
