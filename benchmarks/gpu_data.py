"""The data folder that travels with the checkout to a GPU machine (``gpu-data/``, gitignored).

    python -m benchmarks.gpu_check --prepare-data gpu-data --cifar-dir ../shared/data/cifar2

copies the real CIFAR-2 batches (``cifar-10-batches-py``, about 37 MB) to
``gpu-data/cifar2/cifar-10-batches-py/``, loads them back with flaxcnn's own loader to prove they
are whole, and writes ``gpu-data/MANIFEST.json`` (files, sizes, SHA-256, image counts). The
speech features are not copied: with them the folder would pass the 60 MB that may travel, and
the speech models' throughput does not depend on what the features contain.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from flaxcnn.errors import ConfigError

CIFAR_FILES = ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
#: what may travel with the checkout to the GPU machine, all carried paths together
MAX_BYTES = 60 * 1000 * 1000
MANIFEST = "MANIFEST.json"


def cifar_batches_dir(folder: str | Path) -> Path:
    """``folder`` itself if it holds the CIFAR batches, else its ``cifar-10-batches-py``."""
    folder = Path(folder)
    for candidate in (folder, folder / "cifar-10-batches-py"):
        if all((candidate / name).is_file() for name in CIFAR_FILES):
            return candidate
    raise ConfigError(f"--cifar-dir {folder} holds no CIFAR-10 python batches: expected "
                      f"{', '.join(CIFAR_FILES)} in it or in its cifar-10-batches-py/")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare(out: str | Path, cifar_dir: str | Path, *, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """Copy the CIFAR batches into ``out/cifar2/cifar-10-batches-py``, check them, write the manifest."""
    source = cifar_batches_dir(cifar_dir)
    size = sum((source / name).stat().st_size for name in CIFAR_FILES)
    if size > max_bytes:
        raise ConfigError(f"the CIFAR batches in {source} take {size / 1e6:.1f} MB, more than the "
                          f"{max_bytes / 1e6:.0f} MB that may travel to the GPU machine")
    out = Path(out)
    target = out / "cifar2" / "cifar-10-batches-py"
    target.mkdir(parents=True, exist_ok=True)
    for name in CIFAR_FILES:
        shutil.copyfile(source / name, target / name)
    from flaxcnn.data import load_dataset

    dataset = load_dataset("cifar2", target.parent)
    manifest = {
        "source": str(source),
        "cifar2": {"folder": str(target.relative_to(out)), "train_images": len(dataset.train),
                   "test_images": len(dataset.test), "classes": list(dataset.class_names)},
        "files": {str((target / name).relative_to(out)): {"bytes": (target / name).stat().st_size,
                                                          "sha256": _sha256(target / name)}
                  for name in CIFAR_FILES},
        "total_bytes": size,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def cifar_data_dir(data: str | Path | None) -> Path | None:
    """The ``--data-dir`` for CIFAR-2 inside a prepared folder, or None when there is none."""
    if data is None:
        return None
    folder = Path(data) / "cifar2"
    return folder if (folder / "cifar-10-batches-py" / "test_batch").is_file() else None
