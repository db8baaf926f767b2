"""CIFAR sources (pickle folder, tfds, shipped sample), class selection, normalisation, errors."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxcnn.extras import MissingExtraError

from flaxcnn.data import cifar as cifar_module
from flaxcnn.data.cifar import dataset_name, load_cifar, read_sample, stratified_holdout
from flaxcnn.data.cifar_raw import CIFAR10_CLASSES
from flaxcnn.data.normalize import channel_stats
from flaxcnn.data.safe_pickle import load_restricted
from flaxcnn.errors import ConfigError, DataError

PER_BATCH = 30
N_TEST = 40
META_NAMES = [n.upper().encode() for n in CIFAR10_CLASSES]  # proves names come from the file
SHARED = Path(os.environ.get("FLAXCNN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# ---------------------------------------------------------------- fixtures: the real format


def make_images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 3, 32, 32) with a per-channel offset (so channel stats differ) and labels 0..9."""
    x = rng.integers(0, 200, size=(n, 3, 32, 32), dtype=np.uint8)
    x += np.array([0, 25, 55], dtype=np.uint8)[None, :, None, None]
    y = rng.permutation(np.arange(n) % 10)
    return x, y


def write_batch(path: Path, x: np.ndarray, y: np.ndarray, *, protocol: int = 4, str_keys: bool = False) -> None:
    """A batch as the CIFAR-10 python release stores it: channel-major rows, list labels."""
    entry = {
        b"batch_label": path.name.encode(),
        b"labels": [int(v) for v in y],
        b"data": x.reshape(len(x), -1),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(x))],
    }
    if str_keys:  # what a latin1 load of the original Python 2 files yields
        entry = {k.decode(): v for k, v in entry.items()}
    path.write_bytes(pickle.dumps(entry, protocol=protocol))


@pytest.fixture()
def pickle_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """``tmp/cifar-10-batches-py`` with 5 x 30 train and 40 test images; returns parent + arrays."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    xs, ys = [], []
    for i in range(1, 6):
        x, y = make_images(rng, PER_BATCH)
        write_batch(folder / f"data_batch_{i}", x, y, protocol=2 + i % 4)  # protocols 2..5
        xs.append(x)
        ys.append(y)
    test_x, test_y = make_images(rng, N_TEST)
    write_batch(folder / "test_batch", test_x, test_y, str_keys=True)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": META_NAMES, b"num_vis": 3072}))
    arrays = {"train_x": np.concatenate(xs), "train_y": np.concatenate(ys), "test_x": test_x, "test_y": test_y}
    return tmp_path, arrays


def expected_split(x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    mask = np.isin(y, classes)
    return x[mask], np.array([classes.index(v) for v in y[mask]], dtype=np.int32)


# ---------------------------------------------------------------- pickle source


@pytest.mark.parametrize("which", ["parent", "folder"])
def test_pickle_folder_or_parent_loads_selected_classes(pickle_root, which):
    root, arrays = pickle_root
    data_dir = root if which == "parent" else root / "cifar-10-batches-py"
    ds = load_cifar(data_dir, normalize=False)
    assert ds.name == "cifar2" and ds.class_names == ("AIRPLANE", "BIRD")
    assert ds.info["source_kind"] == "pickle" and "cifar-10-batches-py" in ds.source
    for split in ("train", "test"):
        x, y = expected_split(arrays[f"{split}_x"], arrays[f"{split}_y"], (0, 2))
        got = getattr(ds, split)
        assert got.x.dtype == np.float32 and got.x.shape == (len(x), 3, 32, 32)
        assert got.y.dtype == np.int32
        np.testing.assert_array_equal(got.y, y)
        np.testing.assert_array_equal(got.x, x.astype(np.float32) / np.float32(255))
    assert ds.val is None


def test_class_selection_3_5_maps_in_given_order(pickle_root):
    root, arrays = pickle_root
    ds = load_cifar(root, classes=(5, 3), normalize=False)
    assert ds.name == "cifar-5-3" and ds.class_names == ("DOG", "CAT")
    x, y = expected_split(arrays["train_x"], arrays["train_y"], (5, 3))
    np.testing.assert_array_equal(ds.train.y, y)
    np.testing.assert_array_equal(ds.train.x, x / np.float32(255))
    assert set(ds.train.y.tolist()) == {0, 1}
    assert np.all(arrays["train_y"][np.isin(arrays["train_y"], (5, 3))][ds.train.y == 0] == 5)


def test_all_ten_classes_is_cifar10(pickle_root):
    root, arrays = pickle_root
    ds = load_cifar(root, classes=range(10), normalize=False)
    assert ds.name == "cifar10" and ds.num_classes == 10 and len(ds.train) == 5 * PER_BATCH
    np.testing.assert_array_equal(ds.train.y, arrays["train_y"])


def test_missing_meta_falls_back_to_standard_names(pickle_root):
    root, _ = pickle_root
    (root / "cifar-10-batches-py" / "batches.meta").unlink()
    assert load_cifar(root, classes=(3, 5)).class_names == ("cat", "dog")


@pytest.mark.parametrize(
    "classes, fragment",
    [((0, 10), "unknown class ids [10]"), ((-1, 2), "unknown class ids [-1]"), ((2, 2), "repeat"),
     ((3,), "at least two"), ((), "at least two"), (("a", "b"), "integers"), ((True, 2), "integers")],
)
def test_invalid_classes_list_the_valid_ids(pickle_root, classes, fragment):
    with pytest.raises(DataError) as err:
        load_cifar(pickle_root[0], classes=classes)
    msg = str(err.value)
    assert fragment in msg
    assert all(f"{i} {name}" in msg for i, name in enumerate(CIFAR10_CLASSES))


def test_dataset_names():
    assert dataset_name((0, 2)) == "cifar2"
    assert dataset_name(tuple(range(10))) == "cifar10"
    assert dataset_name((3, 5)) == "cifar-3-5"
    assert dataset_name((2, 0)) == "cifar-2-0"  # swapped labels are not the lab's cifar2


def test_class_absent_from_the_data_is_an_error(pickle_root):
    root, arrays = pickle_root
    folder = root / "cifar-10-batches-py"
    x, y = make_images(np.random.default_rng(1), PER_BATCH)
    write_batch(folder / "data_batch_1", x, np.where(y == 3, 4, y))
    for i in range(2, 6):
        write_batch(folder / f"data_batch_{i}", x, np.where(y == 3, 4, y))
    with pytest.raises(DataError, match="train split has no images of class 3 CAT"):
        load_cifar(root, classes=(3, 5))


# ---------------------------------------------------------------- pickle errors


EVIL_CALLS = {
    "os.system": lambda marker: (os.system, (f"touch {marker}",)),
    "builtins.exec": lambda marker: (exec, (f"open({str(marker)!r}, 'w').close()",)),
    "builtins.open": lambda marker: (open, (str(marker), "w")),
}


class Evil:
    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


@pytest.mark.parametrize("call", sorted(EVIL_CALLS))
@pytest.mark.parametrize("where", ["whole file", "inside labels"])
def test_malicious_pickle_is_refused_and_never_runs(pickle_root, tmp_path, call, where):
    root, _ = pickle_root
    marker = tmp_path / "pwned"
    payload = Evil(EVIL_CALLS[call](marker))
    target = root / "cifar-10-batches-py" / "data_batch_2"
    if where == "whole file":
        target.write_bytes(pickle.dumps(payload))
    else:
        target.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [payload]}))
    with pytest.raises(DataError) as err:
        load_cifar(root)
    msg = str(err.value)
    assert "refused" in msg and str(target) in msg
    assert call.split(".")[1] in msg  # the refused global is named (os.system pickles as posix.system)
    assert not marker.exists()


def test_the_evil_payload_does_work_with_plain_pickle(tmp_path):
    """Guards the test above: the payloads really create the marker when unpickled unsafely."""
    for call, make in EVIL_CALLS.items():
        marker = tmp_path / f"marker_{call}"
        result = pickle.loads(pickle.dumps(Evil(make(marker))))
        if hasattr(result, "close"):
            result.close()
        assert marker.exists(), call


def test_truncated_batch_names_the_file(pickle_root):
    root, _ = pickle_root
    target = root / "cifar-10-batches-py" / "data_batch_4"
    target.write_bytes(target.read_bytes()[: 5000])
    with pytest.raises(DataError, match=f"{target}.*truncated"):
        load_cifar(root)


def test_garbage_batch_names_the_file(pickle_root):
    root, _ = pickle_root
    target = root / "cifar-10-batches-py" / "test_batch"
    target.write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match=str(target)):
        load_cifar(root)


@pytest.mark.parametrize(
    "entry, fragment",
    [([1, 2, 3], "not the dict"),
     ({b"labels": [0]}, "needs 'data' and 'labels'"),
     ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "shape (N, 3072)"),
     ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
     ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 integer labels"),
     ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, "ids 0..9")],
)
def test_malformed_batch_contents(pickle_root, entry, fragment):
    root, _ = pickle_root
    target = root / "cifar-10-batches-py" / "data_batch_1"
    target.write_bytes(pickle.dumps(entry))
    with pytest.raises(DataError) as err:
        load_cifar(root)
    assert fragment in str(err.value) and str(target) in str(err.value)


def test_restricted_loader_still_reads_numpy_arrays(tmp_path):
    for protocol in (2, 3, 4, 5):
        path = tmp_path / f"p{protocol}"
        obj = {b"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "s": np.int64(7), "l": [b"x", "y", 1]}
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        got = load_restricted(path)
        np.testing.assert_array_equal(got[b"a"], obj[b"a"])
        assert got["s"] == 7 and got["l"] == [b"x", "y", 1]


def test_restricted_loader_reads_numpy1_module_names(tmp_path):
    """Files written by numpy 1.x name ``numpy.core.multiarray`` instead of ``numpy._core``."""
    data = pickle.dumps({b"data": np.arange(4, dtype=np.uint8)}, protocol=2)
    assert b"numpy._core.multiarray\n" in data  # protocol 2: GLOBAL opcodes are plain text lines
    path = tmp_path / "old"
    path.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    np.testing.assert_array_equal(load_restricted(path)[b"data"], np.arange(4))


def test_missing_folder_says_what_is_accepted(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar(tmp_path / "nowhere")
    msg = str(err.value)
    assert "does not exist" in msg and "cifar-10-batches-py" in msg
    assert "tensorflow_datasets" in msg and "cifar-10-python.tar.gz" in msg


def test_folder_without_any_layout(tmp_path):
    with pytest.raises(DataError, match="holds neither a cifar-10-batches-py folder .* nor a tfds cifar10"):
        load_cifar(tmp_path)


def test_empty_batches_folder_lists_every_missing_file(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError) as err:
        load_cifar(tmp_path)
    missing = str(err.value).split("missing ")[1].split(" (")[0]
    assert missing == "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch"


def test_partial_folder_lists_the_missing_file(pickle_root):
    root, _ = pickle_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as err:
        load_cifar(root / "cifar-10-batches-py", source="pickle")
    assert "missing data_batch_3 (" in str(err.value)


def test_bad_settings_are_config_errors(pickle_root):
    with pytest.raises(ConfigError, match="auto, pickle, tfds, sample"):
        load_cifar(pickle_root[0], source="web")
    for fraction in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="val_fraction"):
            load_cifar(pickle_root[0], val_fraction=fraction)
    with pytest.raises(DataError, match="needs a data folder"):
        load_cifar(None, source="pickle")


# ---------------------------------------------------------------- normalisation and val split


def test_normalization_uses_selected_train_statistics(pickle_root):
    root, arrays = pickle_root
    ds = load_cifar(root, classes=(1, 4, 7))
    x_train, _ = expected_split(arrays["train_x"], arrays["train_y"], (1, 4, 7))
    x_test, _ = expected_split(arrays["test_x"], arrays["test_y"], (1, 4, 7))
    unit = x_train.astype(np.float64) / 255
    mean, std = unit.mean(axis=(0, 2, 3)), unit.std(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(ds.info["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(ds.info["std"], std, rtol=1e-12)
    assert isinstance(ds.info["mean"], list) and ds.info["normalized"] is True
    assert not np.allclose(mean, mean[0])  # channels really differ in this data
    np.testing.assert_allclose(ds.train.x, (unit - mean[:, None, None]) / std[:, None, None], atol=2e-6)
    np.testing.assert_allclose(ds.test.x, (x_test / 255 - mean[:, None, None]) / std[:, None, None], atol=2e-6)
    np.testing.assert_allclose(ds.train.x.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(ds.train.x.std(axis=(0, 2, 3), ddof=1), 1, atol=1e-5)


def test_normalization_matches_torch_to_tensor_and_normalize(pickle_root):
    torch = pytest.importorskip("torch")
    root, arrays = pickle_root
    ds = load_cifar(root)
    x, _ = expected_split(arrays["train_x"], arrays["train_y"], (0, 2))
    imgs = torch.stack([torch.from_numpy(img).float().div(255) for img in x], dim=3)  # the lab's stack
    mean, std = imgs.view(3, -1).mean(dim=1), imgs.view(3, -1).std(dim=1)
    np.testing.assert_allclose(ds.info["mean"], mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ds.info["std"], std.numpy(), rtol=1e-6)
    ref = torch.from_numpy(x).float().div(255).sub(mean[:, None, None]).div(std[:, None, None])
    np.testing.assert_allclose(ds.train.x, ref.numpy(), atol=1e-6)


def test_channel_stats_rejects_float_input():
    with pytest.raises(DataError, match="uint8"):
        channel_stats(np.zeros((2, 3, 4, 4), np.float32))


def test_val_fraction_holds_out_a_seeded_stratified_slice(pickle_root):
    root, arrays = pickle_root
    ds = load_cifar(root, classes=range(10), val_fraction=0.2, seed=3, normalize=False)
    assert len(ds.val) == 30 and len(ds.train) == 120 and "120 train / 40 test / 30 val" in ds.source
    np.testing.assert_array_equal(np.bincount(ds.val.y), np.full(10, 3))
    # train + val is exactly the original train set
    seen = np.concatenate([ds.train.x, ds.val.x]).reshape(150, -1)
    original = arrays["train_x"].reshape(150, -1) / np.float32(255)
    assert sorted(map(bytes, seen)) == sorted(map(bytes, original))
    # statistics come from what remains in train
    train_u8 = np.rint(ds.train.x * 255).astype(np.uint8)
    np.testing.assert_allclose(ds.info["mean"], channel_stats(train_u8)[0])
    again = load_cifar(root, classes=range(10), val_fraction=0.2, seed=3, normalize=False)
    np.testing.assert_array_equal(again.val.x, ds.val.x)
    other = load_cifar(root, classes=range(10), val_fraction=0.2, seed=4, normalize=False)
    assert not np.array_equal(other.val.x, ds.val.x)


def test_holdout_that_empties_a_class_is_refused():
    with pytest.raises(DataError, match="at least one in val"):
        stratified_holdout(np.array([0, 0, 1, 1, 1, 1]), 0.1, seed=0)


# ---------------------------------------------------------------- tfds source


@pytest.fixture()
def tfds_mock(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    (tmp_path / "cifar10").mkdir()
    with tfds.testing.mock_data(num_examples=60):
        yield tfds, tmp_path


@pytest.mark.parametrize("source", ["tfds", "auto"])
def test_tfds_source_gives_the_same_arrays_as_tfds(tfds_mock, source):
    tfds, data_dir = tfds_mock
    ds = load_cifar(data_dir, classes=(3, 5), source=source, normalize=False)
    assert ds.info["source_kind"] == "tfds" and "tensorflow_datasets cifar10" in ds.source
    assert ds.class_names == ("cat", "dog")  # the mock has placeholder names: standard ones used
    for split in ("train", "test"):
        examples = list(tfds.data_source("cifar10", split=split, data_dir=str(data_dir), download=False))
        x = np.stack([e["image"] for e in examples]).transpose(0, 3, 1, 2)
        y = np.array([e["label"] for e in examples])
        ex, ey = expected_split(x, y, (3, 5))
        got = getattr(ds, split)
        assert len(got) == len(ey) > 0
        np.testing.assert_array_equal(got.y, ey)
        np.testing.assert_array_equal(got.x, ex / np.float32(255))


def test_tfds_dir_without_cifar10(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="no tfds cifar10 folder.*tfds build cifar10"):
        load_cifar(tmp_path, source="tfds")


def test_tfds_cifar10_not_in_array_record_format(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(DataError, match="array_record"):
        load_cifar(tmp_path, source="tfds")


def test_tfds_missing_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "cifar10").mkdir()
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'flaxcnn\[tfds\]'"):
        load_cifar(tmp_path, source="tfds")


def test_auto_without_dir_prefers_prepared_default_tfds(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(cifar_module, "read_tfds", lambda d: calls.append(d) or read_sample())
    load_cifar(None)
    assert calls == []  # nothing prepared: the sample, without touching tfds
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
    (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
    load_cifar(None)
    assert calls == [None]


# ---------------------------------------------------------------- shipped sample


def test_shipped_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    ds = load_cifar(None, normalize=False)
    assert ds.source.startswith("shipped sample of real CIFAR-10 photographs: 600 train / 200 test images")
    assert ds.name == "cifar2" and ds.class_names == ("airplane", "bird")
    assert ds.train.x.shape == (600, 3, 32, 32) and ds.test.x.shape == (200, 3, 32, 32)
    np.testing.assert_array_equal(np.bincount(ds.train.y), [300, 300])
    np.testing.assert_array_equal(np.bincount(ds.test.y), [100, 100])
    assert 0.0 <= ds.train.x.min() and ds.train.x.max() <= 1.0 and ds.train.x.std() > 0.15
    explicit = load_cifar("/ignored", source="sample", normalize=False)
    np.testing.assert_array_equal(explicit.train.x, ds.train.x)


def test_sample_cannot_serve_other_classes():
    with pytest.raises(DataError, match="holds only classes 0 airplane, 2 bird.*cifar-10-batches-py"):
        load_cifar(None, classes=(3, 5), source="sample")


def test_sample_file_is_package_data():
    tomllib = pytest.importorskip("tomllib")
    from fnmatch import fnmatch

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["flaxcnn"]
    assert any(fnmatch("sample/cifar2_sample.npz", p) for p in patterns)


# ---------------------------------------------------------------- real data (optional)


requires_shared = pytest.mark.skipif(
    not (SHARED / "cifar2" / "cifar-10-batches-py").is_dir(),
    reason=f"real CIFAR-2 data not found at {SHARED / 'cifar2'} (set FLAXCNN_SHARED_DATA)",
)


@requires_shared
def test_real_cifar2():
    ds = load_cifar(SHARED / "cifar2", normalize=False)
    assert ds.train.x.shape == (10000, 3, 32, 32) and ds.test.x.shape == (2000, 3, 32, 32)
    np.testing.assert_array_equal(np.bincount(ds.train.y), [5000, 5000])
    np.testing.assert_array_equal(np.bincount(ds.test.y), [1000, 1000])
    np.testing.assert_allclose(ds.train.x.mean(axis=(0, 2, 3)), (0.507, 0.526, 0.506), atol=1.5e-3)
    np.testing.assert_allclose(ds.info["std"], (0.238, 0.233, 0.266), atol=1.5e-3)


@requires_shared
def test_shipped_sample_is_the_first_images_of_the_real_data():
    full = load_cifar(SHARED / "cifar2", normalize=False)
    sample = load_cifar(None, source="sample", normalize=False)
    for split, per_class in (("train", 300), ("test", 100)):
        y = getattr(full, split).y
        keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in (0, 1)]))
        np.testing.assert_array_equal(getattr(sample, split).x, getattr(full, split).x[keep])
        np.testing.assert_array_equal(getattr(sample, split).y, y[keep])
