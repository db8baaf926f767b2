"""flaxcnn's LR finder against Ignite's FastaiLRFinder on the same model, data and batches."""

import dataclasses
import warnings

import jax

import numpy as np
import pytest
import torch

from flaxcnn import convert
from flaxcnn.data import Dataset, SplitArrays
from flaxcnn.models.registry import get_model
from flaxcnn.train.config import TrainConfig
from flaxcnn.train.loop import build_session
from flaxcnn.train.lr_finder import run_sweep, suggest, sweep_lrs
from flaxcnn.train.state import create_state

ignite = pytest.importorskip("ignite", reason="pytorch-ignite is a test dependency (pip install -e .[test])")


def _data(n=320, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3, 32, 32), generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    return x, y


def _ignite(tmodel, x, y, *, batch, start_lr, end_lr, diverge_th, num_iter=None, momentum=0.9):
    from ignite.engine import create_supervised_trainer
    from ignite.handlers import FastaiLRFinder

    optimizer = torch.optim.SGD(tmodel.parameters(), lr=start_lr, momentum=momentum)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    trainer = create_supervised_trainer(tmodel, optimizer, torch.nn.CrossEntropyLoss())
    finder = FastaiLRFinder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with finder.attach(trainer, {"model": tmodel, "optimizer": optimizer}, start_lr=start_lr, end_lr=end_lr,
                           diverge_th=diverge_th, num_iter=num_iter) as t:
            t.run(loader)
    return finder


def _flax(tmodel_state, x, y, *, batch, start_lr, end_lr, diverge_th, num_iter=None, momentum=0.9):
    split = SplitArrays(x.numpy(), y.numpy().astype(np.int32))
    dataset = Dataset("cifar2", split, split, ("airplane", "bird"))
    config = TrainConfig(model="net", dataset="cifar2", batch_size=batch, lr=start_lr, momentum=momentum,
                         shuffle=False, path="step")
    session = build_session(config, dataset)
    model = convert.load_torch_state_dict(get_model("net").build(), tmodel_state)
    _, session.state = create_state(model, session.tx)
    return run_sweep(session, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter, diverge_th=diverge_th)


@pytest.mark.parametrize("end_lr, diverge_th", [(1e-3, 1.05), (10.0, 1.5)], ids=["no-divergence", "diverges"])
def test_history_and_suggestion_equal_ignite(end_lr, diverge_th):
    x, y = _data()
    torch.manual_seed(0)
    tmodel = get_model("net").build_torch()
    initial = {k: v.clone() for k, v in tmodel.state_dict().items()}
    reference = _ignite(tmodel, x, y, batch=32, start_lr=1e-5, end_lr=end_lr, diverge_th=diverge_th)
    ours = _flax(initial, x, y, batch=32, start_lr=1e-5, end_lr=end_lr, diverge_th=diverge_th)
    history = reference.get_results()
    assert len(ours.lrs) == len(history["lr"])
    np.testing.assert_allclose(ours.lrs, history["lr"], rtol=1e-12)
    np.testing.assert_allclose(ours.losses, history["loss"], rtol=1e-5)
    assert ours.suggestion == pytest.approx(reference.lr_suggestion(), rel=1e-12)
    assert ours.diverged == (len(history["lr"]) < 10)
    # Ignite restores the model afterwards: the sweep must not leak into training either
    assert all(torch.equal(initial[k], v) for k, v in tmodel.state_dict().items())


def test_sweep_schedule_shape():
    used, logged = sweep_lrs(1e-8, 1e-3, 10)
    assert used[0] == used[1] and logged[-1] == pytest.approx(1e-3)
    assert np.all(np.diff(logged) > 0)


def test_suggestion_needs_a_decreasing_curve():
    from flaxcnn.errors import TrainingError

    with pytest.raises(TrainingError, match="start-lr"):
        suggest([1.0, 2.0, 3.0], [1e-3, 1e-2, 1e-1])
    # central differences up to the minimum: k=1: (1.0-3.0)/2 = -1.0, k=2: (0.9-2.5)/2 = -0.8
    assert suggest([3.0, 2.5, 1.0, 0.9, 2.0], [1, 2, 3, 4, 5]) == 2


def test_session_state_is_untouched_by_the_sweep():
    x, y = _data(128)
    split = SplitArrays(x.numpy(), y.numpy().astype(np.int32))
    session = build_session(TrainConfig(batch_size=32, shuffle=False), Dataset("cifar2", split, split, ("a", "b")))
    before = [np.asarray(a).copy() for a in jax.tree.leaves(session.state.params)]
    run_sweep(session, start_lr=1e-6, end_lr=1.0, diverge_th=5.0)
    after = jax.tree.leaves(session.state.params)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert dataclasses.is_dataclass(session.config)


def test_the_sweep_refuses_a_session_whose_schedule_would_overrule_it():
    from flaxcnn.errors import ConfigError

    x, y = _data(64)
    split = SplitArrays(x.numpy(), y.numpy().astype(np.int32))
    session = build_session(TrainConfig(batch_size=32, schedule="cosine"), Dataset("cifar2", split, split, ("a", "b")))
    with pytest.raises(ConfigError, match="--schedule constant"):
        run_sweep(session, start_lr=1e-6, end_lr=1.0)
