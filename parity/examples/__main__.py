"""``python -m parity.examples``: the worked example of ``docs/hand-port.md``, end to end.

Converts the PyTorch VGG-style network (``parity.examples.vgg``) to its Flax port and back
(strict), runs the parity suite's checks on it, prints the layer report, and trains both side
by side for a few steps. ``--bug NAME --layer NAME`` plants one of ``parity.examples.bugs``
into the port first, to see the report find it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import torch
from flax import nnx

from flaxcnn import convert
from flaxcnn.models.registry import ModelSpec
from parity.checks import check_model
from parity.examples import bugs
from parity.examples.side_by_side import train_side_by_side
from parity.examples.vgg import VGG, VGGTorch
from parity.layers import compare_layers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.examples", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bug", choices=list(bugs.BUGS), help="plant this bug into the port")
    parser.add_argument("--layer", help="the layer to plant it in (PyTorch name, e.g. features.4)")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="side-by-side training steps (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if bool(args.bug) != bool(args.layer):
        parser.error("--bug and --layer go together")
    kwargs = dict(image_size=args.image_size)

    torch.manual_seed(args.seed)
    tmodel = VGGTorch(**kwargs)
    fmodel = convert.load_torch_state_dict(VGG(**kwargs, rngs=nnx.Rngs(args.seed)), tmodel.state_dict())
    back = convert.to_torch_state_dict(fmodel)
    VGGTorch(**kwargs).load_state_dict(back, strict=True)
    exact = all(torch.equal(back[k], v) for k, v in tmodel.state_dict().items()) and list(back) == list(tmodel.state_dict())
    print(f"torch -> Flax -> torch: {len(back)} tensors, strict load ok, bitwise equal: {'yes' if exact else 'NO'}")

    spec = ModelSpec("vgg-example", VGG, "parity.examples.vgg:VGGTorch", (3, args.image_size, args.image_size),
                     "cross_entropy", "cifar", kwargs=kwargs)
    result = check_model(spec, batch=args.batch, seed=args.seed)
    print(f"parity suite: forward {result.forward_max_abs_diff:.2e}, train forward "
          f"{result.train_forward_max_abs_diff:.2e}, gradients {result.grad_max_abs_diff:.2e}, "
          f"round trip {'yes' if result.roundtrip_exact else 'NO'}: {'PASS' if result.passed else 'FAIL'}")

    if args.bug:
        bugs.BUGS[args.bug](fmodel, args.layer)
        print(f"planted {args.bug} in {args.layer}: {bugs.BUGS[args.bug].__doc__.splitlines()[0]}")
    rng = np.random.default_rng(args.seed + 1)
    x = rng.standard_normal((args.batch, 3, args.image_size, args.image_size)).astype(np.float32)
    report = compare_layers(tmodel, fmodel, x, seed=args.seed)
    print(report.format())

    if args.steps:
        print(f"\nside by side, SGD lr 0.05, batch {args.batch}:")
        print("| step | torch loss | flax loss | max|Δ| params and buffers |")
        print("|-----:|-----------:|----------:|--------------------------:|")
        batches = [(rng.standard_normal(x.shape).astype(np.float32), rng.integers(0, 2, args.batch))
                   for _ in range(args.steps)]
        for row in train_side_by_side(tmodel, fmodel, batches):
            print(f"| {row.step} | {row.torch_loss:.6f} | {row.flax_loss:.6f} | {row.max_abs_diff:.2e} |")
    return 0 if report.passed and result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
