#!/usr/bin/env python
"""Convert a selective-optimizers summary (`torch.save` of `SelectivePeftSummary`) into
peft-selective's summary directory and back.

The toolkit keys its summary by the order of `model.parameters()` (and of the BatchNorm modules in
`model.modules()`), in PyTorch's orientation; peft-selective keys it by burn parameter path, in
burn's orientation (a `Linear` weight is `[d_in, d_out]`, PyTorch's is `[out, in]`). A *layout*
file joins the two:

    {"params": [{"path": "encoder.fc1.weight", "transpose": true}, ...],  # model.parameters() order
     "batch_norm": ["encoder.bn"]}                                       # BatchNorm modules, in order

`layout_of(model)` makes it from the PyTorch model (the module names as paths, `transpose` for
`nn.Linear` weights); pass `rename` to map a PyTorch name to its burn path:

    import json, selective_summary
    json.dump(selective_summary.layout_of(model), open("layout.json", "w"), indent=1)

Usage (torch, safetensors and selective-optimizers installed; the toolkit's summary is a pickle,
read with `weights_only=False`: only convert files you trust):

    python scripts/selective_summary.py to-burn SUMMARY.pt OUT_DIR --layout layout.json \
        [--method id3|pafi|bitfit] [--budget N]
    python scripts/selective_summary.py to-toolkit DIR OUT.pt --layout layout.json

What does not survive a round trip: `shapes[i]` of a parameter without values (the toolkit's loader
ignores it) and the dtype (peft-selective stores f32; `to-toolkit --dtype` picks the one written).
BatchNorm's `num_batches_tracked`, which burn does not have, is kept in `adapter_config.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

PEFT_TYPE = "SELECTIVE"
TENSORS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def layout_of(model: torch.nn.Module, rename=lambda name: name) -> dict:
    """The layout of `model`: its parameters in `model.parameters()` order and its BatchNorms."""
    owners = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (module, name))
    params = []
    for name, p in model.named_parameters():
        module, leaf = owners[id(p)]
        transpose = isinstance(module, torch.nn.Linear) and leaf == "weight"
        params.append({"path": rename(name), "transpose": transpose})
    norms = [rename(n) for n, m in model.named_modules() if isinstance(m, BATCH_NORMS)]
    return {"params": params, "batch_norm": norms}


def _burn_order(pointers: torch.Tensor, values: torch.Tensor, shape, transpose: bool):
    """Flat burn indices (ascending) and the values in that order."""
    coords = pointers.to(torch.int64)
    if transpose:
        burn_shape = [shape[1], shape[0]]
        coords = coords[:, [1, 0]]
    else:
        burn_shape = list(shape)
    flat = torch.zeros(coords.shape[0], dtype=torch.int64)
    for d, size in enumerate(burn_shape):
        flat = flat * size + coords[:, d]
    order = torch.argsort(flat)
    return burn_shape, flat[order], values.reshape(-1)[order]


def to_burn(summary, layout: dict, out_dir: str, method: str, budget: int | None) -> None:
    """Write `summary` as a peft-selective summary directory."""
    if len(summary.values) != len(layout["params"]):
        raise ValueError(f"the summary has {len(summary.values)} parameters, the layout {len(layout['params'])}")
    tensors, params, used = {}, {}, 0
    for values, pointers, shape, entry in zip(summary.values, summary.pointers, summary.shapes, layout["params"]):
        if values is None:
            continue
        path = entry["path"]
        burn_shape, flat, ordered = _burn_order(pointers, values, list(shape), entry["transpose"])
        numel = 1
        for s in burn_shape:
            numel *= s
        full = flat.numel() == numel and numel > 0
        tensors[f"{path}.values"] = ordered.to(torch.float32).contiguous()
        if not full:
            tensors[f"{path}.indices"] = flat.contiguous()
        params[path] = {"shape": burn_shape, "full": full, "count": int(flat.numel())}
        used += int(flat.numel())
    norms = {}
    if len(summary.bn_metadata) != len(layout["batch_norm"]):
        raise ValueError("the summary and the layout have different BatchNorm counts")
    for stats, path in zip(summary.bn_metadata, layout["batch_norm"]):
        for key in ("running_mean", "running_var"):
            t = stats[key].to(torch.float32).reshape(-1).contiguous()
            tensors[f"{path}.{key}"] = t
            norms[f"{path}.{key}"] = {"shape": [t.numel()], "num_batches_tracked": int(stats["num_batches_tracked"])}
    config = {
        "peft_type": PEFT_TYPE,
        "method": method,
        "budget": int(budget if budget is not None else summary.budget_used),
        "budget_used": used,
        "params": params,
    }
    if norms:
        config["batch_norm"] = norms
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, TENSORS))
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def to_toolkit(in_dir: str, layout: dict, dtype=torch.float32):
    """The `SelectivePeftSummary` of a peft-selective summary directory."""
    from selective_optimizers.load_store import SelectivePeftSummary

    with open(os.path.join(in_dir, CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{in_dir}: not a peft-selective summary")
    tensors = load_file(os.path.join(in_dir, TENSORS))
    values, pointers, shapes = [], [], []
    for entry in layout["params"]:
        meta = config["params"].get(entry["path"])
        if meta is None:
            values.append(None)
            pointers.append(None)
            shapes.append(None)
            continue
        burn_shape = meta["shape"]
        vals = tensors[f"{entry['path']}.values"]
        if meta["full"]:
            flat = torch.arange(vals.numel(), dtype=torch.int64)
        else:
            flat = tensors[f"{entry['path']}.indices"].to(torch.int64)
        coords = []
        rest = flat.clone()
        for size in reversed(burn_shape):
            coords.append(rest % size)
            rest = rest // size
        coords = torch.stack(list(reversed(coords)), dim=1) if burn_shape else flat.reshape(-1, 0)
        shape = list(burn_shape)
        if entry["transpose"]:
            coords = coords[:, [1, 0]]
            shape = [burn_shape[1], burn_shape[0]]
        # The toolkit's order: `mask.nonzero()`, row-major in PyTorch's orientation.
        key = torch.zeros(coords.shape[0], dtype=torch.int64)
        for d, size in enumerate(shape):
            key = key * size + coords[:, d]
        order = torch.argsort(key)
        values.append(vals[order].to(dtype))
        pointers.append(coords[order].contiguous())
        shapes.append(torch.Size(shape))
    bn = []
    norms = config.get("batch_norm", {})
    for path in layout["batch_norm"]:
        mean, var = f"{path}.running_mean", f"{path}.running_var"
        bn.append({
            "running_mean": tensors[mean],
            "running_var": tensors[var],
            "num_batches_tracked": torch.tensor(norms[mean].get("num_batches_tracked", 0), dtype=torch.int64),
        })
    used = sum(v.numel() for v in values if v is not None)
    return SelectivePeftSummary(values, pointers, shapes, bn, used)


def same_summary(a, b) -> list[str]:
    """Differences between two toolkit summaries (values and pointers exact, shapes where values
    exist, BatchNorm statistics, budget used); empty when they are the same."""
    diffs = []
    if len(a.values) != len(b.values):
        return [f"{len(a.values)} vs {len(b.values)} parameters"]
    for i, (va, vb) in enumerate(zip(a.values, b.values)):
        if (va is None) != (vb is None):
            diffs.append(f"parameter {i}: values present in one summary only")
        elif va is not None:
            if not torch.equal(va.to(torch.float32), vb.to(torch.float32)):
                diffs.append(f"parameter {i}: values differ")
            if not torch.equal(a.pointers[i], b.pointers[i]):
                diffs.append(f"parameter {i}: pointers differ")
            if list(a.shapes[i]) != list(b.shapes[i]):
                diffs.append(f"parameter {i}: shapes {a.shapes[i]} vs {b.shapes[i]}")
    if len(a.bn_metadata) != len(b.bn_metadata):
        diffs.append("BatchNorm counts differ")
    for j, (x, y) in enumerate(zip(a.bn_metadata, b.bn_metadata)):
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            if not torch.equal(x[key].to(y[key].dtype), y[key]):
                diffs.append(f"BatchNorm {j}: {key} differs")
    if int(a.budget_used) != int(b.budget_used):
        diffs.append(f"budget_used {a.budget_used} vs {b.budget_used}")
    return diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-burn", help="toolkit summary (.pt) -> peft-selective directory")
    a.add_argument("summary")
    a.add_argument("out_dir")
    a.add_argument("--layout", required=True)
    a.add_argument("--method", default="unknown", help="id3, pafi or bitfit (the .pt does not say)")
    a.add_argument("--budget", type=int, help="the run's budget (default: the entries used)")
    b = sub.add_parser("to-toolkit", help="peft-selective directory -> toolkit summary (.pt)")
    b.add_argument("in_dir")
    b.add_argument("out")
    b.add_argument("--layout", required=True)
    b.add_argument("--dtype", default="float32", help="dtype of the written values")
    args = parser.parse_args(argv)
    with open(args.layout) as f:
        layout = json.load(f)
    if args.cmd == "to-burn":
        summary = torch.load(args.summary, weights_only=False)
        to_burn(summary, layout, args.out_dir, args.method, args.budget)
    else:
        summary = to_toolkit(args.in_dir, layout, getattr(torch, args.dtype))
        torch.save(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
