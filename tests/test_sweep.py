"""``flaxcnn sweep``: combinations, strategies, vmap == one run after another, run directories."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from flaxcnn.cli import main
from flaxcnn.data import Dataset, SplitArrays
from flaxcnn.errors import ConfigError
from flaxcnn.train.config import TrainConfig
from flaxcnn.train.loop import load_run
from flaxcnn.train.optim import sgd, transplant
from flaxcnn.train.sweep import choose_strategy, member_configs, member_state, run_sweep, stack_states, sweep_sgd


def _dataset(n: int = 64, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 2, n).astype(np.int32)
    return Dataset("cifar2", SplitArrays(x, y), SplitArrays(x[:32], y[:32]), ("airplane", "bird"), source="random")


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(jax.tree.leaves(a),
                                                                                     jax.tree.leaves(b)))


BASE = TrainConfig(model="net", epochs=2, batch_size=24, momentum=0.9, checkpoint_every=2)  # 64 images: 24+24+16


# ----------------------------------------------------------------------------- configurations

def test_members_are_every_combination_with_their_own_run_directory(tmp_path):
    configs = member_configs(BASE, tmp_path, seeds=[0, 1], lrs=[0.01, 0.05], weight_decays=[0.0, 1e-3])
    assert len(configs) == 8
    assert {(c.seed, c.lr, c.weight_decay) for c in configs} == {
        (s, lr, wd) for s in (0, 1) for lr in (0.01, 0.05) for wd in (0.0, 1e-3)}
    assert configs[0].out == str(tmp_path / "seed0-lr0.01-wd0")
    assert all(c.epochs == 2 and c.batch_size == 24 and c.momentum == 0.9 for c in configs)


def test_unlisted_settings_come_from_the_base_config(tmp_path):
    (only,) = member_configs(TrainConfig(model="net", seed=7, lr=0.03, weight_decay=1e-4), tmp_path)
    assert (only.seed, only.lr, only.weight_decay, only.epochs, only.batch_size) == (7, 0.03, 1e-4, 100, 64)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"seeds": [0, 0]}, "repeats"),
    ({"lrs": [0.01, -1.0]}, "--lr"),
    ({"weight_decays": [-0.1]}, "--weight-decay"),
    ({"seeds": [-1]}, "--seed"),
])
def test_bad_sweep_values_are_refused(tmp_path, kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        member_configs(BASE, tmp_path, **kwargs)


def test_auto_strategy_is_sequential_on_cpu_and_vmap_refuses_a_schedule():
    assert jax.default_backend() == "cpu"
    assert choose_strategy("auto", BASE) == "sequential"
    assert choose_strategy("vmap", BASE) == "vmap"
    with pytest.raises(ConfigError, match="--schedule constant"):
        choose_strategy("vmap", TrainConfig(schedule="cosine"))
    with pytest.raises(ConfigError, match="--strategy"):
        choose_strategy("pmap", BASE)


# ----------------------------------------------------------------------------- optimizer layout

@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_a_member_state_has_flaxcnn_trains_optimizer_layout(momentum, weight_decay):
    from flaxcnn.train.loop import build_session

    config = TrainConfig(model="net", epochs=1, batch_size=32, momentum=momentum, weight_decay=weight_decay)
    session = build_session(config, _dataset(32))
    stacked = stack_states(session, [session.config, session.config])
    state = member_state(stacked, 1, session.config)
    expected = sgd(0.01, momentum, weight_decay).init(state.params)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(expected)
    assert float(state.opt_state.hyperparams["learning_rate"]) == pytest.approx(0.01)


def test_injected_weight_decay_zero_changes_nothing():
    params = {"w": jax.numpy.linspace(-1.0, 1.0, 7)}
    grads = {"w": jax.numpy.linspace(0.3, -0.2, 7)}
    tx, ref = sweep_sgd(0.1, 0.0, 0.9), sgd(0.1, 0.9, 0.0)
    state, ref_state = tx.init(params), ref.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        ref_updates, ref_state = ref.update(grads, ref_state, params)
        assert np.array_equal(np.asarray(updates["w"]), np.asarray(ref_updates["w"]))
    # the member's state in sgd's layout (what its checkpoints hold) carries the same values
    standard = transplant(state, sgd(0.1, 0.9, 0.0).init(params))
    assert jax.tree.structure(standard) == jax.tree.structure(ref_state)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(standard), jax.tree.leaves(ref_state)))


# ----------------------------------------------------------------------------- vmap vs sequential

@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory):
    """vmap: seeds 0, 1 x weight decay 0, 1e-3 (lr 0.03); sequential: seed 1's two runs of them."""
    root = tmp_path_factory.mktemp("sweeps")
    dataset = _dataset()
    reports = {s: run_sweep(BASE, root / s, seeds=seeds, lrs=[0.03], weight_decays=[0.0, 1e-3], strategy=s,
                            quiet=True, dataset=dataset)
               for s, seeds in (("vmap", [0, 1]), ("sequential", [1]))}
    return root, reports


def test_both_strategies_write_one_run_directory_per_combination(two_sweeps):
    root, reports = two_sweeps
    for strategy, report in reports.items():
        assert report["strategy"] == strategy and len(report["members"]) == (4 if strategy == "vmap" else 2)
        assert json.loads((root / strategy / "sweep.json").read_text())["strategy"] == strategy
        for member in report["members"]:
            run = root / strategy / member["run_dir"]
            assert member["status"] == "ok"
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert [r["epoch"] for r in rows] == [1, 2]
            summary = json.loads((run / "summary.json").read_text())
            assert (summary["seed"], summary["lr"], summary["weight_decay"]) == (
                member["seed"], member["lr"], member["weight_decay"])
            assert (run / "curves.png").exists() and (run / "checkpoints" / "best.json").exists()


def test_vmap_members_equal_their_sequential_runs(two_sweeps):
    root, reports = two_sweeps
    for member in reports["sequential"]["members"]:
        (_, vm, _), (_, seq, _) = (load_run(root / s / member["run_dir"]) for s in ("vmap", "sequential"))
        assert _max_diff(vm.params, seq.params) <= 1e-5, member["name"]
        assert _max_diff(vm.opt_state, seq.opt_state) <= 1e-4, member["name"]  # momentum traces
        rows = [[json.loads(line) for line in (root / s / member["run_dir"] / "metrics.jsonl").read_text()
                 .splitlines()] for s in ("vmap", "sequential")]
        for a, b in zip(*rows):
            assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)


def test_members_really_differ(two_sweeps):
    root, reports = two_sweeps
    states = [load_run(root / "vmap" / m["run_dir"])[1] for m in reports["vmap"]["members"]]
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            assert _max_diff(states[i].params, states[j].params) > 1e-4


def test_a_vmap_member_evaluates_and_resumes_like_a_train_run(two_sweeps, tmp_path):
    from flaxcnn.train.loop import fit

    root, reports = two_sweeps
    # a copy: the module's sweep stays as the other tests read it
    run = shutil.copytree(root / "vmap" / reports["vmap"]["members"][-1]["run_dir"], tmp_path / "member")
    session, state, epoch = load_run(run, dataset=_dataset())  # restores into sgd(lr, momentum, wd)'s layout
    summary = json.loads((run / "summary.json").read_text())
    assert epoch == 2
    assert session.evaluate(state, "test")["accuracy"] == pytest.approx(summary["test_accuracy"])
    config = TrainConfig.from_json(json.loads((run / "config.json").read_text())["config"])
    resumed = fit(dataclasses.replace(config, epochs=3, out=str(run)), resume=True, quiet=True, dataset=_dataset())
    assert resumed["epochs"] == 3


def test_vmap_members_augment_like_their_sequential_runs(tmp_path):
    """Augmentation (mixup here) is part of the shared step: each stacked member draws its own
    seed's stream, as its ``flaxcnn train`` run does."""
    base = dataclasses.replace(BASE, epochs=1, mixup=0.4)
    dataset = _dataset()
    for strategy, seeds in (("vmap", [0, 1]), ("sequential", [1]), ("plain", [1])):
        config = dataclasses.replace(base, mixup=0.0) if strategy == "plain" else base
        run_sweep(config, tmp_path / strategy, seeds=seeds, lrs=[0.03], strategy=strategy.replace("plain", "vmap"),
                  quiet=True, dataset=dataset)
    member = "seed1-lr0.03-wd0"
    vm, seq, plain = (load_run(tmp_path / s / member, dataset=dataset)[1] for s in ("vmap", "sequential", "plain"))
    assert _max_diff(vm.params, seq.params) <= 1e-5
    assert _max_diff(vm.params, plain.params) > 1e-4


# ----------------------------------------------------------------------------- command line

def test_cli_sweep_writes_the_runs_and_a_diverging_member_fails_alone(tmp_path, capsys):
    """Each member's learning rate is its own: the huge one diverges, the other trains on, and
    the command reports the failure with status 1."""
    out = tmp_path / "sweep"
    assert main(["sweep", "--lrs", "0.01,3e38", "--epochs", "1", "--batch-size", "200", "--strategy", "vmap",
                 "--out", str(out), "--quiet"]) == 1
    report = json.loads((out / "sweep.json").read_text())
    assert [(m["name"], m["status"]) for m in report["members"]] == [("seed0-lr0.01-wd0", "ok"),
                                                                     ("seed0-lr3e+38-wd0", "failed")]
    assert "training loss became nan" in report["members"][1]["error"]
    assert (out / "seed0-lr0.01-wd0" / "summary.json").exists()
    assert not (out / "seed0-lr3e+38-wd0" / "summary.json").exists()


def test_cli_refuses_bad_sweep_lists_before_any_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--seeds", "a,b"])
    assert "--seeds takes comma-separated int" in capsys.readouterr().err
    assert main(["sweep", "--strategy", "vmap", "--schedule", "cosine", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
