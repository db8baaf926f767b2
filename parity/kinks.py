"""Why a gradient check can fail with both frameworks correct: ReLUs decided by rounding.

A ReLU whose input lies within float32 rounding of zero passes or blocks its gradient depending
on the last bits of a forward pass; two correct float32 implementations (PyTorch's and
flaxcnn's, or two kernel variants) can decide it differently, and every gradient upstream moves
by that element's whole contribution. This check counts, in PyTorch's own train-mode run, the
inputs of the ReLU after ``layer`` within ``band`` of zero, and measures how far flipping
exactly those decisions moves PyTorch's gradients (the rerun replays the recorded dropout masks,
whose arithmetic alone moves them by about 1e-7). When that is larger than the gradient
tolerance, the tolerance cannot hold for this batch whoever computes it, and the parity check
replays flaxcnn's decisions at such elements into PyTorch (:mod:`parity.relu_decisions`).

    python -m parity.kinks --model speechresnet-wide --layer s3b1_bn1      # batch 64, seed 0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from flaxcnn.models.registry import MODELS, get_model
from parity.checks import GRAD_TOL, reference_and_batch
from parity.losses import torch_loss
from parity.precision import full_precision
from parity.dropout import forward_hooks, record_torch_masks, replay_torch_masks


@full_precision()
def relu_kinks(model_name: str, layer: str, *, band: float = 1e-5, batch: int = 64, seed: int = 0) -> dict:
    """``{"near_zero": count, "values": [...], "elements": n, "grad_shift": {param: max |Δ|}}``
    for the output of module ``layer`` (the ReLU's input) of the PyTorch reference, built and fed
    as :func:`parity.checks.check_model` does (at full precision, for the call)."""
    spec = get_model(model_name)
    model, state, x, y = reference_and_batch(spec, batch, seed)
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"{model_name} has no module {layer!r}; modules: {', '.join(n for n in modules if n)}")

    captured = {}

    def keep_output(_module, _inputs, out) -> None:  # returns None: the output is left as it is
        captured["out"] = out.detach()

    model.train()
    with forward_hooks([(modules[layer], keep_output)]), record_torch_masks(model) as masks:
        out = model(x)
    torch_loss(spec.loss, out, y).backward()
    near = captured["out"].abs() < band

    flipped = spec.build_torch()
    flipped.load_state_dict(state)
    flipped.train()
    flip = (dict(flipped.named_modules())[layer], lambda _m, _i, out: torch.where(near, -out, out))
    with forward_hooks([flip]), replay_torch_masks(flipped, masks):
        out = flipped(x)
    torch_loss(spec.loss, out, y).backward()
    flipped_grads = dict(flipped.named_parameters())
    shift = {name: float((flipped_grads[name].grad - p.grad).abs().max()) for name, p in model.named_parameters()}
    return {"near_zero": int(near.sum()), "values": captured["out"][near].tolist(), "elements": near.numel(),
            "grad_shift": shift}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.kinks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=list(MODELS))
    parser.add_argument("--layer", required=True, help="the module whose output feeds a ReLU (e.g. s3b1_bn1)")
    parser.add_argument("--band", type=float, default=1e-5, help="how close to zero counts (default 1e-5)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = relu_kinks(args.model, args.layer, band=args.band, batch=args.batch, seed=args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    worst = max(result["grad_shift"], key=result["grad_shift"].get)
    print(f"{args.model} {args.layer}: {result['near_zero']} of {result['elements']:,} ReLU inputs within "
          f"{args.band:g} of zero {[f'{v:.2e}' for v in result['values'][:8]]}; flipping their decisions moves "
          f"PyTorch's gradients by up to {result['grad_shift'][worst]:.2e} ({worst}; tolerance {GRAD_TOL:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
