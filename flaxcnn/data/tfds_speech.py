"""The tfds ``speech_commands`` data set, read from a prepared tfds data folder (never downloaded).

Its builder needs TensorFlow, which flaxcnn does not depend on, so TensorFlow and
tensorflow_datasets are imported only here, only when this source is asked for.

Note: tfds ``speech_commands`` has 12 labels - the ten command words ``down go left no off on
right stop up yes``, ``_silence_`` and ``_unknown_`` (every other word) - not the 35 words the
speech lab trained on, and it carries no speaker ids, so no speaker-disjoint split is possible.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from flaxcnn.data.logfbank import clips_to_features
from flaxcnn.data.splits import SplitIndices
from flaxcnn.extras import require
from flaxcnn.errors import DataError

BUILDER = "speech_commands"
TFDS_SPLITS = ("train", "validation", "test")
INSTALL_HINT = (
    "install TensorFlow next to flaxcnn's tfds extra: pip install 'flaxcnn[tfds]' tensorflow-cpu "
    "(or tensorflow)"
)


def require_tensorflow() -> None:
    """DataError unless TensorFlow can be imported (the speech_commands builder needs it)."""
    if importlib.util.find_spec("tensorflow") is None:
        raise DataError(
            f"source='tfds' reads tfds '{BUILDER}', whose builder needs TensorFlow, which is not "
            f"installed; {INSTALL_HINT}. Without TensorFlow use source='npy' (melspec_feats.npy + "
            "labels.npy) or source='wav' (<word>/*.wav folders)."
        )


def read_tfds_speech(data_dir: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], SplitIndices]:
    """(features (N, 99, 26), labels (N,), class names, official train/validation/test indices).

    The three tfds splits are concatenated in train, validation, test order.
    """
    tfds = require("tensorflow_datasets", "reading Speech Commands from a tensorflow_datasets folder")
    require_tensorflow()

    builder = tfds.builder(BUILDER, data_dir=str(data_dir))
    if not builder.is_prepared():
        raise DataError(
            f"tfds '{BUILDER}' is not prepared under {data_dir} (nothing is downloaded at run "
            f"time); prepare it once where internet is available: tfds build {BUILDER} "
            f"--data_dir {data_dir}"
        )
    labels: list[int] = []
    sizes: list[int] = []

    def audio():  # streams clips so only one batch of audio is in memory at a time
        for split in TFDS_SPLITS:
            sizes.append(0)
            for example in tfds.as_numpy(builder.as_dataset(split=split)):
                labels.append(int(example["label"]))
                sizes[-1] += 1
                yield example["audio"]

    features = clips_to_features(audio())
    bounds = np.cumsum([0, *sizes])
    official = SplitIndices(*(np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(3)))
    names = tuple(builder.info.features["label"].names)
    return features, np.asarray(labels, dtype=np.int64), names, official
