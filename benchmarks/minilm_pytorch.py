#!/usr/bin/env python3
"""PyTorch + PEFT side of the MiniLM benchmark (the Rust side is examples/bench_minilm.rs).

    python benchmarks/minilm_pytorch.py --model DIR [--threads 2] [--rounds 3] [--steps 5] [--json OUT]
    python benchmarks/minilm_pytorch.py --model DIR --profile   # where PEFT's LoRA step spends its time

Same workload as the Rust side: all-MiniLM-L6-v2 `BertModel`, batch 16 x 128 tokens (the same
deterministic ids, no padding), loss mean(last_hidden_state^2), AdamW (lr 1e-4, weight decay
0.01, eps 1e-8), dropout off; full fine-tuning, PEFT LoRA r=16 alpha 32 on query/key/value/dense,
and the eval forward under torch.inference_mode(). Medians over rounds of per-round medians, ms.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertModel

BATCH, SEQ = 16, 128


def load(model_dir: str) -> BertModel:
    model = BertModel.from_pretrained(model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model.train()


def step_fn(model, ids, mask):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, eps=1e-8)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def timed(steps: int, f) -> float:
    f()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        f()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def profile(step, steps: int) -> None:
    """Self CPU time per op of `steps` LoRA steps, with the GEMM share (mm, addmm, bmm) per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"per step: {total / steps / 1e3:.0f} ms, GEMMs (mm, addmm, bmm) {gemm / steps / 1e3:.0f} ms "
          f"({100 * gemm / total:.0f} %)")
    # The step's three dense product shapes alone (2048 tokens), median of 20 runs each; the Rust
    # side's are in `cargo bench -p peft-kernels --bench linear`.
    for m, k, n in [(BATCH * SEQ, 384, 1536), (BATCH * SEQ, 1536, 384), (BATCH * SEQ, 384, 384)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        t = sorted(times)[len(times) // 2]
        print(f"[{m}, {k}] x [{k}, {n}]: {t * 1e3:.2f} ms, {2 * m * k * n / t / 1e9:.0f} GFLOP/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true", help="profile the PEFT LoRA step by op and exit")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    full = load(a.model)
    vocab = full.config.vocab_size
    ids = torch.tensor([1000 + ((i * 7919 + 13) % (vocab - 1000)) for i in range(BATCH * SEQ)]).reshape(BATCH, SEQ)
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    lora = get_peft_model(
        load(a.model), LoraConfig(r=16, lora_alpha=32, target_modules=["query", "key", "value", "dense"])
    )
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    print(f"trainable: full {sum(p.numel() for p in full.parameters())}, PEFT LoRA {trainable}")
    evaluator = load(a.model).eval()

    def forward() -> float:
        with torch.inference_mode():
            return evaluator(input_ids=ids, attention_mask=mask).last_hidden_state[0, 0, 0].item()

    f_full, f_lora = step_fn(full, ids, mask), step_fn(lora, ids, mask)
    if a.profile:
        profile(f_lora, a.steps)
        return
    res = {"full_ft_ms": [], "peft_lora_ms": [], "eval_forward_ms": []}
    for r in range(a.rounds):
        res["full_ft_ms"].append(timed(a.steps, f_full))
        res["peft_lora_ms"].append(timed(a.steps, f_lora))
        res["eval_forward_ms"].append(timed(a.steps, forward))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in res.items()))
    out = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
    out["torch"] = torch.__version__
    out["threads"] = a.threads
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
