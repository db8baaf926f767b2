"""Settings come from one place, the fields of TrainConfig: the command line, the lab defaults,
validation, ``flaxcnn presets`` and the ``--resume`` merge are generated from them."""

from __future__ import annotations

import dataclasses
import shlex

import pytest

from flaxcnn.cli import build_parser, config_from_args
from flaxcnn.errors import ConfigError
from flaxcnn.train.config import PRESETS, TrainConfig, apply_preset, as_options, check_setting, flag_of, settings


def _subparser(command: str):
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices[command]


@pytest.mark.parametrize("command", ["train", "sweep", "cv", "lr-find"])
def test_every_settable_field_is_one_option_of_each_training_command(command):
    options = {a.dest: a for a in _subparser(command)._actions}
    settable = {f.name for f, _ in settings() if flag_of(f.name)}
    assert settable <= set(options), settable - set(options)
    for name in settable:
        assert flag_of(name) in options[name].option_strings
        assert options[name].default is None  # unset options leave the preset's and the field's values


@pytest.mark.parametrize("dataset, expected", [
    ("cifar2", dict(model="net", epochs=100, batch_size=64, lr=1e-2, momentum=0.0)),
    ("speech", dict(model="convnet", epochs=150, batch_size=256, lr=1e-3, momentum=0.9)),
])
def test_lab_defaults_follow_the_data_set(dataset, expected):
    resolved = TrainConfig(dataset=dataset).resolved()
    assert {k: getattr(resolved, k) for k in expected} == expected
    args = _subparser("train").parse_args(["--dataset", dataset])
    assert config_from_args(args).out == f"runs/{expected['model']}-{dataset}"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_is_valid_and_what_flaxcnn_presets_prints_sets_it(name):
    expected = apply_preset(TrainConfig(), name)
    expected.resolved()
    args = _subparser("train").parse_args(shlex.split(as_options(PRESETS[name][1])))
    assert dataclasses.replace(config_from_args(args), out=expected.out, preset=name) == expected


def test_resume_keeps_the_runs_settings_but_where_and_how_long():
    saved = TrainConfig(model="net-width", lr=0.05, epochs=10, devices=2, out="old")
    given = TrainConfig(lr=0.5, epochs=None, devices=None, out="new")
    assert given.for_resume(saved) == dataclasses.replace(saved, out="new", devices=None)
    assert dataclasses.replace(given, epochs=20).for_resume(saved).epochs == 20


@pytest.mark.parametrize("name, value, message", [
    ("devices", 0, "--devices must be an integer >= 1, got 0"),
    ("init", "zeros", "--init must be one of torch, flax, got 'zeros'"),
    ("eval_batch_size", 0, "eval batch size must be >= 1, got 0"),
    ("epochs", 2.5, "--epochs must be an integer >= 1, got 2.5"),
])
def test_one_check_per_field(name, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_setting(name, value)
    check_setting(name, getattr(TrainConfig(), name))  # the default passes
