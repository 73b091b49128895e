#!/usr/bin/env python3
"""PyTorch + PEFT side of the SmolLM2 LoRA training-step benchmark (the Rust side is
examples/bench_smollm2_train.rs; benchmarks/smollm2_train.sh runs both).

    python benchmarks/smollm2_train.py [--gguf FILE] [--shapes 4x128,1x512] [--rounds 3]
        [--warmup 2] [--steps 5] [--threads 2] [--json OUT]
    python benchmarks/smollm2_train.py --profile [--shapes 4x128]   # where the step's time goes

Same workload as the Rust side: SmolLM2-135M-Instruct from the same GGUF file, dequantized to
float32 by transformers' GGUF loader; PEFT LoRA r=16, lora_alpha=32, dropout 0 on
q/k/v/o/gate/up/down_proj; micro-batches of `batch x seq` tokens cut from the same text (example i
is f"{i} " + TEXT * 64, tokenized and cut to `seq`), no padding, every token a label (the causal-LM
loss of `labels=input_ids`); torch.optim.AdamW (lr 1e-4, weight decay 0.01) over the adapters.
A step is zero_grad, forward with the loss, backward and the optimizer step, up to reading the
loss; tokens/s = batch * seq over its time. Each round builds a fresh PEFT model and optimizer
(as every Rust round is a fresh `burn-peft train` run), leaves out `--warmup` steps and reports
the median of the next `--steps`; the run reports the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("The history of the printing press begins with movable type in East Asia and continues "
        "through Gutenberg's workshop in Mainz, where metal type, oil-based ink and a screw press "
        "came together. ")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def default_gguf() -> Path:
    if os.environ.get("BURN_PEFT_SMOLLM2"):
        return Path(os.environ["BURN_PEFT_SMOLLM2"])
    if os.environ.get("BURN_PEFT_CACHE"):
        return Path(os.environ["BURN_PEFT_CACHE"]) / "SmolLM2-135M-Instruct" / FILE
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "burn-peft" / "SmolLM2-135M-Instruct" / FILE


def shape(s: str) -> tuple[int, int]:
    b, t = s.split("x")
    return int(b), int(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", type=Path, default=default_gguf())
    p.add_argument("--shapes", default="4x128,1x512")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gguf: Path = args.gguf
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    text_ids = [tok(f"{i} " + TEXT * 64, add_special_tokens=False)["input_ids"] for i in range(16)]

    def fresh(batch: int, seq: int):
        base.load_state_dict(base_state)
        model = get_peft_model(base, config)
        model.train()
        ids = torch.tensor([text_ids[i][:seq] for i in range(batch)])
        assert ids.shape == (batch, seq), ids.shape
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        mask = torch.ones_like(ids)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            opt.step()
            return loss.item()

        return model, step, sum(p.numel() for p in params)

    result = {}
    for s in args.shapes.split(","):
        batch, seq = shape(s)
        if args.profile:
            model, step, _ = fresh(batch, seq)
            from torch.profiler import ProfilerActivity, profile

            for _ in range(args.warmup):
                step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
            model.unload()
            continue
        per_round = []
        for r in range(args.rounds):
            model, step, trainable = fresh(batch, seq)
            for _ in range(args.warmup):
                step()
            rates = []
            for _ in range(args.steps):
                start = time.perf_counter()
                loss = step()
                assert loss == loss, "NaN loss"
                rates.append(batch * seq / (time.perf_counter() - start))
            m = statistics.median(rates)
            per_round.append(m)
            print(f"{s} round {r + 1}: {m:.0f} tokens/s (steps: {' '.join(f'{x:.0f}' for x in rates)}; "
                  f"trainable {trainable})", flush=True)
            model.unload()  # the base model back, without the adapters
        m = statistics.median(per_round)
        print(f"{s}: {m:.0f} tokens/s, {batch * seq / m * 1e3:.0f} ms per step ({args.threads} threads)")
        result[s] = {"tokens_per_s": m, "rounds": per_round}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
