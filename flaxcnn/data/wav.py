"""Reading Speech Commands style wav folders: ``<word>/<speaker>_nohash_<n>.wav``.

Only what the lab's features assume is accepted: 16 kHz, mono, 16-bit PCM. Samples are returned
as raw int16 values, the scale the lab's ``melspec_feats.npy`` was computed on.
"""

from __future__ import annotations

import os
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flaxcnn.errors import DataError

ACCEPTED_RATE = 16000
ACCEPTED_CHANNELS = 1
ACCEPTED_WIDTH_BYTES = 2
ACCEPTED_FORMAT = "16 kHz mono 16-bit PCM"
#: Folders of the official release that hold no command word.
IGNORED_PREFIX = "_"  # e.g. _background_noise_
SPEAKER_SEPARATOR = "_nohash_"


@dataclass(frozen=True)
class WavEntry:
    """One clip of a word folder: path relative to the root (``word/file.wav``), label, speaker."""

    relpath: str
    word: str
    speaker: str


def read_wav(path: str | os.PathLike) -> np.ndarray:
    """Samples of a 16 kHz mono 16-bit PCM wav as int16; any other format is a DataError."""
    try:
        with wave.open(str(path), "rb") as wf:
            rate, channels, width = wf.getframerate(), wf.getnchannels(), wf.getsampwidth()
            got = f"{rate} Hz, {channels} channel(s), {8 * width}-bit"
            if (rate, channels, width) != (ACCEPTED_RATE, ACCEPTED_CHANNELS, ACCEPTED_WIDTH_BYTES):
                raise DataError(f"{path}: has {got}; accepted: {ACCEPTED_FORMAT}")
            frames = wf.getnframes()
            raw = wf.readframes(frames)
    except (wave.Error, EOFError) as err:
        raise DataError(f"{path}: not a readable PCM wav ({err}); accepted: {ACCEPTED_FORMAT}") from err
    except OSError as err:  # a folder named *.wav, a broken link, no permission
        raise DataError(f"{path}: cannot read ({err.strerror or err}); accepted: {ACCEPTED_FORMAT} files") from err
    if len(raw) != frames * ACCEPTED_WIDTH_BYTES:
        raise DataError(
            f"{path}: truncated: its header announces {frames} samples but the file holds "
            f"{len(raw) / ACCEPTED_WIDTH_BYTES:g}; replace it with a complete copy"
        )
    return np.frombuffer(raw, dtype="<i2").astype(np.int16)


def speaker_of(filename: str) -> str:
    """Speaker id from ``<speaker>_nohash_<n>.wav``; the whole stem when the name has no marker."""
    stem = Path(filename).stem
    return stem.split(SPEAKER_SEPARATOR, 1)[0]


def word_folders(root: Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that hold at least one .wav (``_*`` skipped)."""
    if not root.is_dir():
        return []
    return sorted(
        d.name for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(IGNORED_PREFIX) and any(d.glob("*.wav"))
    )


def scan_wav_folder(root: Path) -> list[WavEntry]:
    """Every clip under ``root/<word>/*.wav``, in word then file-name order."""
    return [
        WavEntry(relpath=f"{word}/{f.name}", word=word, speaker=speaker_of(f.name))
        for word in word_folders(root)
        for f in sorted((root / word).glob("*.wav"))
    ]


def read_list_file(path: Path) -> set[str]:
    """Entries (``word/file.wav``) of validation_list.txt / testing_list.txt."""
    return {line.strip().replace("\\", "/") for line in path.read_text().splitlines() if line.strip()}
