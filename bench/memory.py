"""Memory of a whole training step, IVON against torch.optim.AdamW.

    python -m bench.memory                      # the tiny GPT, on cuda if present, else cpu
    python -m bench.memory --config gpt2-125m --json out.json

Two questions, each answered in one table:

1. **A training step's peak** (forward, backward, optimizer step, then zero_grad), in steady
   state (after two warm-up steps), and what stays allocated between steps: IVON's drop-in step
   against AdamW (fused on a GPU, foreach on a CPU) with ``zero_grad(set_to_none=True)``, which
   frees AdamW's gradients between steps; IVON keeps its flat gradient buffer (docs/DESIGN.md
   section 4). On a GPU: the caching allocator's ``max_memory_allocated`` and
   ``memory_allocated``. On a CPU: torch's profiler memory timeline (``profile_memory``; the
   ``torch.profiler._memory_profiler`` module, private, so the numbers are labelled as its).
2. **What frozen params cost**: the first half of the GPT's blocks frozen (``requires_grad=False``,
   as a LoRA base is), the optimizer built from ``model.parameters()`` (everything, as users pass
   it to AdamW) and from the trainable params only: bytes of optimizer state plus gradient
   buffers after one step. IVON's frozen params wait outside its buckets (Note [params that
   wait]), so both should cost the same.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ivon_fast import IVON

from .gpt import CONFIGS, GPT, markov_batches

BATCH = 4


def optimizers(device: torch.device) -> dict:
    """name -> (builder from params, zero_grad keyword arguments)."""
    fused = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    return {
        "AdamW": (lambda params: torch.optim.AdamW(params, lr=1e-4, **fused),
                  dict(set_to_none=True)),
        "IVON": (lambda params: IVON(params, lr=0.1, ess=1e6, resample_on_step=True), {}),
    }


def _train_step(model, optimizer, zero_grad: dict, batch) -> None:
    model(*batch).backward()
    optimizer.step()
    optimizer.zero_grad(**zero_grad)


def _cpu_peak(step) -> tuple:
    """(peak bytes during ``step()``, bytes allocated when it ends), from the profiler's memory
    timeline of CPU tensors."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(
        torch.device("cpu"))
    totals = [sum(row) for row in sizes]
    return max(totals), totals[-1]


def step_peaks(config, device: torch.device) -> list:
    rows = []
    batches = [(x.to(device), y.to(device)) for x, y in markov_batches(config, BATCH, 3)]
    for name, (build, zero_grad) in optimizers(device).items():
        torch.manual_seed(0)
        model = GPT(config).to(device)
        optimizer = build(model.parameters())
        for batch in batches[:2]:   # warm-up: state and buffers exist
            _train_step(model, optimizer, zero_grad, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            _train_step(model, optimizer, zero_grad, batches[2])
            torch.cuda.synchronize()
            peak, held = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
            method = "torch.cuda.max_memory_allocated"
        else:
            peak, held = _cpu_peak(lambda: _train_step(model, optimizer, zero_grad, batches[2]))
            method = "torch.profiler memory timeline (private API)"
        rows.append(dict(optimizer=name, peak_bytes=peak, held_between_steps=held,
                         method=method))
        del model, optimizer
    for row in rows:
        row["peak_vs_adamw"] = row["peak_bytes"] / rows[0]["peak_bytes"]
    return rows


def _state_and_grad_bytes(model, optimizer) -> int:
    seen, total = set(), 0
    tensors = [p.grad for p in model.parameters() if p.grad is not None]
    if isinstance(optimizer, IVON):   # its flat buffers (the state views share them)
        for bucket in optimizer._layout.buckets:
            tensors += [bucket.grad_flat, bucket.mean, bucket.momentum, bucket.hess]
    else:
        tensors += [v for state in optimizer.state.values() for v in state.values()
                    if torch.is_tensor(v)]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def frozen_costs(config, device: torch.device) -> list:
    rows = []
    batch = [t.to(device) for t in markov_batches(config, BATCH, 1)[0]]
    for name, (build, zero_grad) in optimizers(device).items():
        for given in ("model.parameters()", "trainable params"):
            torch.manual_seed(0)
            model = GPT(config).to(device)
            for block in model.blocks[:len(model.blocks) // 2]:
                block.requires_grad_(False)
            params = (list(model.parameters()) if given == "model.parameters()"
                      else [p for p in model.parameters() if p.requires_grad])
            optimizer = build(params)
            model(*batch).backward()
            optimizer.step()
            rows.append(dict(optimizer=name, given=given,
                             trainable=sum(p.numel() for p in params if p.requires_grad),
                             state_and_grad_bytes=_state_and_grad_bytes(model, optimizer)))
    return rows


def print_tables(result: dict) -> None:
    print(f"# {result['config']} on {result['device']}; one training step, batch {BATCH}")
    print("| optimizer | peak MB | vs AdamW | held between steps MB | measured by |")
    print("| --- | --- | --- | --- | --- |")
    for row in result["step_peaks"]:
        print(f"| {row['optimizer']} | {row['peak_bytes'] / 1e6:.1f} | "
              f"{row['peak_vs_adamw']:.2f}x | {row['held_between_steps'] / 1e6:.1f} | "
              f"{row['method']} |")
    print("\n# half the blocks frozen: optimizer state and gradient buffers")
    print("| optimizer | given | trainable params | state + grad MB |")
    print("| --- | --- | --- | --- |")
    for row in result["frozen_costs"]:
        print(f"| {row['optimizer']} | {row['given']} | {row['trainable']} | "
              f"{row['state_and_grad_bytes'] / 1e6:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    device, config = torch.device(args.device), CONFIGS[args.config]
    result = dict(config=args.config, device=str(device), batch=BATCH,
                  step_peaks=step_peaks(config, device), frozen_costs=frozen_costs(config, device))
    print_tables(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
