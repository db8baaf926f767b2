"""``python -m parity``: every registered model against its PyTorch reference.

Prints a table, writes ``--json PATH`` if asked, exits 1 if any check fails. With ``--layers``,
prints instead one layer-by-layer table per model (:mod:`parity.layers`) and exits 1 if any
layer diverges.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from flaxcnn.models.registry import MODELS, get_model
from parity.checks import FORWARD_TOL, GRAD_TOL, TRAIN_FORWARD_TOL, ParityResult, check_model


def format_table(results: Sequence[ParityResult]) -> str:
    header = ("model", "#params", "fwd max|Δ|", "train max|Δ|", "grad max|Δ|", "ReLU replayed", "shapes ok",
              "round trip ok", "passed")
    rows = [header] + [
        (
            r.name, f"{r.params:,}", f"{r.forward_max_abs_diff:.2e}", f"{r.train_forward_max_abs_diff:.2e}",
            f"{r.grad_max_abs_diff:.2e}", str(r.relu_decisions_replayed), "yes" if r.shapes_match else "NO",
            "yes" if r.roundtrip_exact else "NO", "PASS" if r.passed else "FAIL",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run(models: Sequence[str] | None = None, *, batch: int = 64, seed: int = 0) -> list[ParityResult]:
    return [check_model(get_model(name), batch=batch, seed=seed) for name in (models or list(MODELS))]


def layers_main(models: Sequence[str], *, batch: int, seed: int) -> int:
    """Print the layer report of each model; 0 when no layer diverges, else 1."""
    from parity.layers import report_for_model

    passed = True
    for name in models:
        report = report_for_model(name, batch=batch, seed=seed)
        print(f"{name} (batch {batch}, seed {seed})")
        print(report.format())
        print()
        passed &= report.passed
    return 0 if passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: all registered models")
    parser.add_argument("--batch", type=int, default=64,
                        help="batch size (default 64: the lab's, and the batch the benchmarks time)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", action="store_true",
                        help="layer-by-layer report: every layer's output, output gradient and buffers, "
                             "and the first layer over tolerance")
    args = parser.parse_args(argv)
    if args.layers:
        if args.json:
            parser.error("--json is not available with --layers")
        return layers_main(args.models or list(MODELS), batch=args.batch, seed=args.seed)
    results = run(args.models, batch=args.batch, seed=args.seed)
    print(format_table(results))
    print(f"tolerances: forward {FORWARD_TOL:g}, train-mode forward {TRAIN_FORWARD_TOL:g}, gradients {GRAD_TOL:g} "
          "(float32, full-precision matmul/conv, batch %d, seed %d)" % (args.batch, args.seed))
    for r in results:
        if r.relu_decisions_replayed:
            print(f"{r.name}: {r.relu_decisions_replayed} ReLU decisions made by rounding (inputs within tolerance "
                  f"of zero, decided differently) replayed into PyTorch; without the replay grad max|Δ| is "
                  f"{r.grad_max_abs_diff_unreplayed:.2e}")
    for r in results:
        for problem in r.problems:
            print(f"{r.name}: {problem}", file=sys.stderr)
    passed = all(r.passed for r in results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": [r.as_json() for r in results], "passed": passed}, f, indent=2)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
