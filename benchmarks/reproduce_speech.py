"""The speech lab's ConvNet and flaxcnn's SpeechNet on speakers unseen in training.

    python -m benchmarks.reproduce_speech --data-dir ../shared/data/speech10 [--seeds 0,1,2]

Both train on the speaker-disjoint 80/10/10 split (fixed split seed 42, so every training seed is
scored on the same held-out speakers). ConvNet uses the speech lab's settings (preset
``speech-convnet``: SGD momentum 0.9, batch 256, 150 epochs, lr 1e-3 -- the top of the lab's
LR-finder sweep; 1e-2 diverges on these unnormalised features), SpeechNet its preset
``speech-baseline``. Settings were chosen on the validation split; the test split is read once
per run, after the last epoch. Writes ``OUT/speech.json`` and ``OUT/speech.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from flaxcnn.data import load_dataset
from flaxcnn.train.config import TrainConfig, apply_preset
from flaxcnn.train.loop import fit

PRESETS = {"convnet": "speech-convnet", "speechnet": "speech-baseline"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", default="speechnet,convnet")
    parser.add_argument("--epochs", type=int, help="override the presets' epochs (for a quick check)")
    parser.add_argument("--out", default="benchmarks/results/speech")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset("speech", args.data_dir, split="speaker")
    path = out / "speech.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for model in args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            config = apply_preset(TrainConfig(), PRESETS[model])
            config = dataclasses.replace(config, data_dir=args.data_dir, split="speaker", seed=seed,
                                         epochs=args.epochs or config.epochs, out=str(out / "runs" / f"{model}-{seed}"))
            summary = fit(config, quiet=True, overwrite=True, dataset=dataset)
            results.setdefault(model, {})[str(seed)] = {
                k: summary[k] for k in ("train_accuracy", "val_accuracy", "test_accuracy", "seconds", "epochs")}
            path.write_text(json.dumps(results, indent=2))
            print(model, seed, json.dumps(results[model][str(seed)]), flush=True)
    (out / "speech.md").write_text(markdown(results, dataset.info))
    print(markdown(results, dataset.info))
    return 0


def markdown(results: dict, info: dict) -> str:
    sizes = info.get("split_sizes", {})
    speakers = info.get("speakers", {})
    lines = [f"Speaker-disjoint split: {sizes} clips, {speakers} speakers.", "",
             "| model | seeds | epochs | test acc mean | test acc min | val acc mean | train acc mean | s per run |",
             "|---|---|---|---|---|---|---|---|"]
    for model, runs in results.items():
        rows = list(runs.values())
        mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
        lines.append(f"| {model} | {len(rows)} | {rows[0]['epochs']} | {mean('test_accuracy'):.4f} | "
                     f"{min(r['test_accuracy'] for r in rows):.4f} | {mean('val_accuracy'):.4f} | "
                     f"{mean('train_accuracy'):.4f} | {mean('seconds'):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
