"""Lab 8's runs in flaxcnn next to PyTorch runs of the same protocol.

    python -m benchmarks.reproduce_lab8 --data-dir ../shared/data/cifar2 [--epochs 100] [--runs net,l2,wd]

For each lab-8 preset: ``flaxcnn.train.loop.fit`` trains one run; the PyTorch side trains the lab's
class with the lab's loop body (SGD, ``weight_decay``, the explicit L2 penalty) from the *same
initial weights* (converted from the Flax init) on the *same batches in the same order* (the
engine's per-epoch permutation) and the same normalised tensors. Both report eval-mode train and
test accuracy after the last epoch and wall-clock seconds of training. Dropout masks come from
different random streams, so dropout runs agree only statistically.
Writes ``OUT/lab8.json`` and ``OUT/lab8.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from flaxcnn import convert
from flaxcnn.data import load_dataset
from flaxcnn.data.batching import epoch_permutation
from flaxcnn.models.registry import get_model
from flaxcnn.train.config import PRESETS, TrainConfig, apply_preset
from flaxcnn.train.loop import fit

RUNS = {"net": "lab8-net", "width": "lab8-width", "depth": "lab8-depth", "dropout": "lab8-dropout",
        "batchnorm": "lab8-batchnorm", "l2": "lab8-l2", "wd": "lab8-wd"}


def torch_run(config: TrainConfig, dataset, init_state: dict) -> dict:
    """The lab's PyTorch loop on the same data, init and batch order."""
    spec = get_model(config.model)
    model = spec.build_torch(dataset.num_classes)
    model.load_state_dict(init_state, strict=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum or 0.0,
                                weight_decay=config.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.from_numpy(dataset.train.x), torch.from_numpy(dataset.train.y.astype(np.int64))
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.from_numpy(epoch_permutation(config.seed, epoch, len(y)).astype(np.int64))
        for batch in order.split(config.batch_size):
            outputs = model(x[batch])
            loss = loss_fn(outputs, y[batch])
            if config.l2:
                loss = loss + config.l2 * sum(torch.norm(p, 2) for p in model.parameters())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    accuracy = {}
    with torch.no_grad():
        for split in ("train", "test"):
            data = getattr(dataset, split)
            predictions = torch.cat([model(chunk).argmax(1) for chunk in torch.from_numpy(data.x).split(1000)])
            accuracy[split] = float((predictions.numpy() == data.y).mean())
    return {"train_accuracy": accuracy["train"], "test_accuracy": accuracy["test"], "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from: {', '.join(RUNS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/lab8-100")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset("cifar2", args.data_dir)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    results_path = out / "lab8.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for key in args.runs.split(","):
        preset = RUNS[key]
        config = apply_preset(TrainConfig(), preset)
        config = dataclasses.replace(config, data_dir=args.data_dir, epochs=args.epochs, seed=args.seed,
                                     out=str(out / "runs" / preset))
        spec = get_model(config.model)
        init = convert.to_torch_state_dict(spec.build(dataset.num_classes, seed=args.seed))
        summary = fit(config, quiet=True, overwrite=True, dataset=dataset)
        row = {"preset": preset, "description": PRESETS[preset][0], "epochs": args.epochs,
               "flaxcnn": {k: summary[k] for k in ("train_accuracy", "test_accuracy", "seconds")}}
        if not args.skip_torch:
            row["torch"] = torch_run(dataclasses.replace(config, epochs=args.epochs), dataset, init)
        results[preset] = row
        results_path.write_text(json.dumps(results, indent=2))
        print(json.dumps(row))
    (out / "lab8.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = ["| run | epochs | flaxcnn train acc | flaxcnn test acc | flaxcnn s | torch train acc | torch test acc "
             "| torch s |", "|---|---|---|---|---|---|---|---|"]
    for preset, row in results.items():
        f, t = row["flaxcnn"], row.get("torch")
        torch_cells = (f"{t['train_accuracy']:.4f} | {t['test_accuracy']:.4f} | {t['seconds']:.0f}" if t
                       else "not run | not run | -")
        lines.append(f"| {preset} | {row['epochs']} | {f['train_accuracy']:.4f} | {f['test_accuracy']:.4f} | "
                     f"{f['seconds']:.0f} | {torch_cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
