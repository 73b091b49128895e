#!/usr/bin/env python3
"""SmolLM2-135M-Instruct prompt processing and greedy generation speed in transformers (float32,
the GGUF file dequantized) and in llama.cpp (llama-cpp-python, the Q4_1 blocks kept packed), on a
fixed number of threads; the burn-peft side is `burn-peft generate`'s stderr timing line (see
`benchmarks/smollm2_generate.sh`, which runs all three in one go).

    python benchmarks/smollm2_generate.py --side transformers|llamacpp [--gguf FILE]
        [--threads 2] [--prefill 512] [--new 128] [--rounds 3]

Prints one line per round: `prefill_tok_s=... decode_tok_s=...`, then the medians. Prefill is
one forward over `--prefill` prompt tokens (a fixed text repeated and cut to length); decode is
`--new` greedy tokens after the chat prompt that `burn-peft generate --chat` builds for the same
question, timed from the first generated token to the last
(so it excludes the prompt's own forward), with end-of-sequence ignored so that every round makes
exactly `--new` tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("The history of the printing press begins with movable type in East Asia and continues "
        "through Gutenberg's workshop in Mainz, where metal type, oil-based ink and a screw press "
        "came together. ")
QUESTION = "Tell me a long story about a lighthouse keeper."


def default_gguf() -> Path:
    if os.environ.get("BURN_PEFT_SMOLLM2"):
        return Path(os.environ["BURN_PEFT_SMOLLM2"])
    if os.environ.get("BURN_PEFT_CACHE"):
        return Path(os.environ["BURN_PEFT_CACHE"]) / "SmolLM2-135M-Instruct" / FILE
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "burn-peft" / "SmolLM2-135M-Instruct" / FILE


def run_transformers(args) -> list[tuple[float, float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    gguf: Path = args.gguf
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    long_ids = tok(TEXT * 64, add_special_tokens=False)["input_ids"][: args.prefill]
    chat_ids = chat_prompt_ids(tok)
    results = []
    for _ in range(args.rounds):
        with torch.no_grad():
            t0 = time.perf_counter()
            model(torch.tensor([long_ids]))
            prefill = len(long_ids) / (time.perf_counter() - t0)
            stamps = []

            class Clock:
                def put(self, value):
                    stamps.append(time.perf_counter())

                def end(self):
                    pass

            model.generate(torch.tensor([chat_ids]), attention_mask=torch.ones(1, len(chat_ids), dtype=torch.long),
                           max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                           temperature=None, top_p=None, top_k=None, streamer=Clock())
            # The streamer's first call is the prompt, the second the first new token.
            decode = (len(stamps) - 2) / (stamps[-1] - stamps[1])
        results.append((prefill, decode))
    return results


def hf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def chat_prompt_ids(tok) -> list[int]:
    """The prompt `burn-peft generate --chat --prompt QUESTION` runs: the model's chat template
    with its default system message and the generation prompt."""
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prefill_text(tok, n: int) -> str:
    """The first `n` tokens of the prefill text, as text (what `burn-peft generate --prompt` gets)."""
    return tok.decode(tok(TEXT * 64, add_special_tokens=False)["input_ids"][:n])


def run_llamacpp(args) -> list[tuple[float, float]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(args.gguf), n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=args.prefill + args.new + 64, n_batch=args.prefill, verbose=False)
    tok = hf_tokenizer(args.gguf)
    long_ids = tok(TEXT * 64, add_special_tokens=False)["input_ids"][: args.prefill]
    chat_ids = chat_prompt_ids(tok)
    results = []
    for _ in range(args.rounds):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(long_ids)
        prefill = len(long_ids) / (time.perf_counter() - t0)
        llm.reset()
        llm.eval(chat_ids)
        stamps = []
        for _ in range(args.new):
            tok = llm.sample(top_k=1, temp=0.0)
            llm.eval([tok])
            stamps.append(time.perf_counter())
        decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        results.append((prefill, decode))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["transformers", "llamacpp", "prefill-text"], required=True,
                        help="prefill-text prints the prefill prompt as text, for burn-peft")
    parser.add_argument("--gguf", type=Path, default=default_gguf())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.gguf.is_file():
        print(f"error: {args.gguf} not found; run python3 scripts/fetch_smollm2.py", file=sys.stderr)
        return 1
    if args.side == "prefill-text":
        print(prefill_text(hf_tokenizer(args.gguf), args.prefill), end="")
        return 0
    results = run_transformers(args) if args.side == "transformers" else run_llamacpp(args)
    for p, d in results:
        print(f"{args.side} round prefill_tok_s={p:.1f} decode_tok_s={d:.1f}")
    print(f"{args.side} median prefill_tok_s={statistics.median(p for p, _ in results):.1f} "
          f"decode_tok_s={statistics.median(d for _, d in results):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
