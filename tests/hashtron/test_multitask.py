"""Training several tasks one after another, and building a pipeline from settings."""

from __future__ import annotations

import json

import pytest

from kiln.errors import ConfigError
from kiln.hashtron.multitask import DEFAULT_TASKS, build_pipeline, format_reports, train_tasks
from kiln.hashtron.settings import HashtronSettings, TaskSettings
from kiln.hashtron.tasks import TASK_NAMES, load_task


def test_five_tasks_train_and_are_reported() -> None:
    settings = HashtronSettings.from_dict({"pipeline": {"epochs": 1}})
    seen = []
    tasks = ["isalnum", "isdigit", "isupper", "ispunct", "majority",
             TaskSettings(name="squareroot", options={"n": 256})]
    reports = train_tasks(tasks, settings, seed=0, on_task=seen.append)
    assert [r.task for r in reports] == ["isalnum", "isdigit", "isupper", "ispunct",
                                         "majority", "squareroot"]
    assert seen == reports and all(r.ok and r.error is None for r in reports)
    for r in reports:
        assert r.steps > 0 and 0 <= r.train_accuracy <= 1 and 0 <= r.eval_accuracy <= 1
        assert r.generalisation_gap == r.train_accuracy - r.eval_accuracy
        json.dumps(r.to_dict())
    majority = reports[4]
    assert majority.eval_accuracy > majority.eval_majority_baseline + 0.1  # it generalises
    table = format_reports(reports)
    assert table.count("\n") == len(reports) + 1 and "| majority | yes |" in table


def test_a_failing_task_does_not_stop_the_others() -> None:
    reports = train_tasks([TaskSettings(name="csv"), "isdigit"],
                          HashtronSettings.from_dict({"pipeline": {"epochs": 1}}))
    assert [r.ok for r in reports] == [False, True]
    assert "options.path" in reports[0].error and "NO:" in format_reports(reports)


def test_build_pipeline_uses_the_task_shape_or_the_settings() -> None:
    settings = HashtronSettings.from_dict({"task": {"name": "isdigit"}})
    pipe, task = build_pipeline(settings, seed=3)
    assert pipe.network.layers[0].width == 16 and pipe.eval is not None
    custom = settings.replace(layers=({"width": 4, "combiner": {"kind": "sum", "dims": [4]}},
                                      {"width": 1}))
    pipe2, _ = build_pipeline(custom, seed=3, task=task)
    assert [layer.width for layer in pipe2.network.layers] == [4, 1]
    # the network does not depend on the direction; the pipeline RNG is a separate stream
    fwd, _ = build_pipeline(settings.replace(pipeline={"direction": "forward"}), seed=3,
                            task=load_task(settings.task))
    assert fwd.network.layers[0].neurons == pipe.network.layers[0].neurons


def test_default_tasks_are_those_that_need_no_files_and_no_extra() -> None:
    assert set(DEFAULT_TASKS) == set(TASK_NAMES) - {"digits", "mnist_idx", "csv", "jsonl"}


def test_tasks_that_need_data_files_are_refused_before_any_trains() -> None:
    seen: list = []
    with pytest.raises(ConfigError) as info:
        train_tasks(["isalnum", "csv", "mnist_idx"], on_task=seen.append)
    assert seen == []
    assert "csv, mnist_idx need data files" in str(info.value)
    assert "kiln train --config hashtron --set hashtron.task.name=csv" in str(info.value)


def test_task_options_are_refused_before_any_trains() -> None:
    seen: list = []
    settings = HashtronSettings.from_dict({"task": {"options": {"n": 64}}})
    with pytest.raises(ConfigError, match=r"^hashtron.task.options: .*\{'n': 64\}") as info:
        train_tasks(["isalnum", "squareroot"], settings, on_task=seen.append)
    assert seen == [] and "--set hashtron.task.options.KEY=VALUE" in str(info.value)
