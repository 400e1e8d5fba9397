"""One optimizer step as Kiln builds it (fused kernels) against torch's per-tensor loop.

What is timed
    ``optimizer.step()`` over the parameters of a model with gradients in place: the default
    code LM at ``--lm`` sizes, and the full 11 x 15 x 15 lattice (61.9M parameters) with
    ``--lattice``. Each optimizer (AdamW, SGD with Nesterov momentum) runs as Kiln builds it
    (``kiln.engine.optim.build_optimizer``: fused where torch has the kernel) and as torch's
    single-tensor loop (``fused=False, foreach=False``, what torch picks on a CPU by default),
    side by side in one process, alternating, median of ``--repeats`` after two warm-ups.
    The last column checks the two give the same weights to float tolerance (the fused kernel
    rounds in another order, so they are not bit-identical).

    .venv/bin/python benchmarks/optimizer_step.py --threads 1
    .venv/bin/python benchmarks/optimizer_step.py --threads 2 --lattice
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from kiln.config import OptimizerSection
from kiln.engine.optim import build_optimizer
from kiln.models.gpt import GPT, GPTShape
from kiln.models.lattice import Lattice, LatticeShape


def _built_with_gradients(build: Callable[[], nn.Module]) -> nn.Module:
    """The same model every call: seeded weights, seeded gradients."""
    torch.manual_seed(0)
    model = build()
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return model


def _loop_optimizer(model: nn.Module, cfg: OptimizerSection) -> torch.optim.Optimizer:
    """Kiln's optimizer with torch's per-tensor loop instead of the fused kernel."""
    optimizer = build_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = False, False
    return optimizer


def _time_steps(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(repeats + 2):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            if i >= 2:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def compare(label: str, build: Callable[[], nn.Module], name: str, repeats: int) -> None:
    cfg = OptimizerSection(name=name, lr=1e-3, weight_decay=0.1, momentum=0.9, nesterov=True)
    fused_model, loop_model = _built_with_gradients(build), _built_with_gradients(build)
    fused, loop = build_optimizer(fused_model, cfg), _loop_optimizer(loop_model, cfg)
    seconds = _time_steps({"fused": fused.step, "loop": loop.step}, repeats)
    params = sum(p.numel() for p in fused_model.parameters())
    agree = all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True)
    )
    print(f"| {label} | {params / 1e6:.1f}M | {name} | {seconds['loop'] * 1e3:,.0f} ms | "
          f"{seconds['fused'] * 1e3:,.0f} ms | {seconds['loop'] / seconds['fused']:.1f}x | "
          f"{'yes' if agree else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lm", default="8x512,32x256", help="GPT sizes, n_layers x d_model")
    parser.add_argument("--lattice", action="store_true", help="also the full lattice")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    print("| model | parameters | optimizer | per-tensor loop | fused (Kiln) | speed-up | "
          "same weights |")
    print("|---|---|---|---|---|---|---|")
    models: dict[str, Callable[[], nn.Module]] = {}
    for size in filter(None, args.lm.split(",")):
        layers, width = (int(x) for x in size.split("x"))
        models[f"GPT {size}"] = lambda layers=layers, width=width: GPT(GPTShape(
            vocab_size=8192, context=256, n_layers=layers, n_heads=4, d_model=width, mlp_ratio=4,
            dropout=0.0, bias=True, layernorm_eps=1e-5, init_std=0.02))
    if args.lattice:
        models["lattice 11x15x15"] = lambda: Lattice(LatticeShape())
    for label, build in models.items():
        for name in ("adamw", "sgd"):
            compare(label, build, name, args.repeats)


if __name__ == "__main__":
    main()
