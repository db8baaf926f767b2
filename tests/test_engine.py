"""The engine's jitted step equals the labs' PyTorch training step, step after step.

Each test trains the PyTorch reference with the lab's loop body and the converted Flax model with
flaxcnn's jitted step on the same batches, then compares every parameter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxcnn import convert
from flaxcnn.models.registry import get_model
from flaxcnn.train.optim import sgd
from flaxcnn.train.state import create_state, to_model
from flaxcnn.train.steps import EpochRunner, make_train_step


def _lab_step(model, optimizer, loss_fn, x, y, l2):
    outputs = model(x)
    loss = loss_fn(outputs, y)
    if l2:
        loss = loss + l2 * sum(torch.norm(p, 2) for p in model.parameters())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def _compare(name, *, steps, batch, lr=1e-2, momentum=0.0, weight_decay=0.0, l2=0.0, path="step", n=None,
             no_dropout=False):
    spec = get_model(name)
    torch.manual_seed(0)
    tmodel = spec.build_torch()
    fmodel = convert.load_torch_state_dict(spec.build(), tmodel.state_dict())
    if no_dropout:  # random streams differ between frameworks; the parity suite replays masks
        tmodel.dropout.p = 0.0
        fmodel.dropout.rate = 0.0
    n = n or steps * batch
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((n, *spec.input_chw), generator=gen)
    num_classes = tmodel.fc2.out_features
    y = torch.randint(0, num_classes, (n,), generator=gen)
    order = np.random.default_rng(2).permutation(n)[: steps * batch] if n > steps * batch else np.arange(n)

    optimizer = torch.optim.SGD(tmodel.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = torch.nn.NLLLoss() if spec.loss == "nll" else torch.nn.CrossEntropyLoss()
    tmodel.train()
    lab_sum = 0.0
    for b in range(steps):
        idx = torch.as_tensor(order[b * batch:(b + 1) * batch])
        lab_sum += _lab_step(tmodel, optimizer, loss_fn, x[idx], y[idx], l2)

    tx = sgd(lr, momentum, weight_decay)
    graphs, state = create_state(fmodel, tx)
    runner = EpochRunner(make_train_step(graphs, spec.loss, tx, l2), path)
    state = runner.run(state, jnp.asarray(x.numpy()), jnp.asarray(y.numpy(), jnp.int32), order, batch)
    trained = convert.to_numpy_state_dict(to_model(graphs, state))
    diffs = {k: float(np.max(np.abs(trained[k] - v.numpy()))) for k, v in tmodel.state_dict().items()
             if v.dtype.is_floating_point}
    return diffs, lab_sum, float(state.metrics.objective)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(weight_decay=1e-3),
    dict(l2=1e-3),
    dict(momentum=0.9, weight_decay=1e-3),
], ids=["plain", "weight-decay", "l2-penalty", "momentum+wd"])
def test_net_trajectory_matches_torch(kwargs):
    diffs, lab_sum, flax_sum = _compare("net", steps=20, batch=32, **kwargs)
    assert max(diffs.values()) <= 1e-5, diffs
    assert flax_sum == pytest.approx(lab_sum, rel=1e-5)  # the lab's printed "Training loss"


def test_l2_penalty_is_not_weight_decay():
    diffs_wd, _, _ = _compare("net", steps=5, batch=16, weight_decay=1e-1)
    diffs_l2, _, _ = _compare("net", steps=5, batch=16, l2=1e-1)
    assert max(diffs_wd.values()) <= 1e-5 and max(diffs_l2.values()) <= 1e-5


def test_batchnorm_trajectory_including_running_stats():
    diffs, _, _ = _compare("net-batchnorm", steps=8, batch=16, momentum=0.9, no_dropout=True)
    stats = {k: v for k, v in diffs.items() if "running" in k}
    assert stats and max(diffs.values()) <= 1e-5, diffs


def test_net_depth_with_momentum():
    # In this data, step 7 has a 2x2 window of NetDepth's second max-pool whose two largest values
    # differ by one float32 ulp (6e-8): float32 rounding decides which one gets the gradient, in
    # either framework. After it the weights differ from PyTorch's by 4e-6 (XLA's convolutions) or
    # 1.1e-5 (flaxcnn's C++ kernels) rather than ~1e-8 before; a wrong gradient would be >> 1e-3.
    diffs, _, _ = _compare("net-depth", steps=10, batch=16, momentum=0.9)
    assert max(diffs.values()) <= 3e-5, diffs


def test_full_epoch_with_partial_last_batch_matches_torch():
    # 157 steps like one lab epoch of CIFAR-2 would be slow here; 10 batches + a partial one
    diffs, lab_sum, flax_sum = _compare("net", steps=11, batch=64, n=10 * 64 + 16)
    assert max(diffs.values()) <= 1e-5
    assert flax_sum == pytest.approx(lab_sum, rel=1e-5)


def test_scan_path_equals_step_path():
    spec = get_model("net")
    x = jax.random.normal(jax.random.key(0), (200, 3, 32, 32))
    y = jax.random.randint(jax.random.key(1), (200,), 0, 2)
    order = np.random.default_rng(0).permutation(200)
    results = []
    for path in ("step", "scan"):
        tx = sgd(1e-2, 0.9)
        graphs, state = create_state(spec.build(seed=1), tx)
        state = EpochRunner(make_train_step(graphs, spec.loss, tx), path).run(state, x, y, order, 64)
        results.append(jax.tree.leaves(state.params))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-6)
