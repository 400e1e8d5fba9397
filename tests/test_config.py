"""Config schema, loading, overrides and the errors a user sees."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kiln.config import (
    JOB_SECTIONS,
    Config,
    SourceSection,
    apply_overrides,
    load_config,
    packaged_config_names,
    resolve_config,
    validate_config,
)
from kiln.errors import ConfigError
from kiln.hashtron.settings import HashtronSettings, settings_table


def test_packaged_configs_validate() -> None:
    names = packaged_config_names()
    assert {"default", "smoke", "fim_cot", "hashtron", "hashtron_forward", "nca"} <= set(names)
    for name in names:
        opt_in = ["eval.allow_code_execution=true"] if name == "fim_cot" else []
        assert isinstance(load_config(name, opt_in), Config)


def test_code_execution_needs_an_explicit_opt_in() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("fim_cot")
    message = str(err.value)
    assert "eval: the passk suite runs model-generated code" in message
    assert "eval.allow_code_execution: true" in message
    with pytest.raises(ConfigError, match="must include 'ppl'"):
        load_config("smoke", ["eval.suites=[compile]"])


def test_required_keys_exist_with_defaults() -> None:
    cfg = Config()
    assert cfg.seed == 1337
    assert cfg.training.max_steps >= 1
    assert cfg.training.micro_batch_size >= 1
    assert cfg.training.grad_accum_steps >= 1
    assert cfg.checkpoint.every_steps >= 0
    assert cfg.hardware.device == "auto"
    assert cfg.hardware.threads == "auto"


def leaf_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted key, field) for every value field; sub-sections are walked, not listed."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from leaf_fields(annotation, f"{prefix}{name}.")
        else:
            yield prefix + name, field


def test_every_default_is_documented_in_the_schema() -> None:
    fields = [*leaf_fields(Config), *leaf_fields(SourceSection, "data.sources.")]
    assert [key for key, field in fields if not field.description] == []


def test_overrides_apply_and_parse_yaml_scalars() -> None:
    cfg = load_config("smoke", ["training.max_steps=7", "optimizer.betas=[0.8, 0.9]",
                                "precision.dtype=bf16", "hardware.threads=1"])
    assert cfg.training.max_steps == 7
    assert cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.precision.dtype == "bf16"
    assert cfg.hardware.threads == 1


def test_exponent_floats_are_floats_in_files_and_overrides(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 1e-4 as a string; strict fields such as hashtron's refused it.
    path = tmp_path / "c.yaml"
    path.write_text("job: hashtron\nhashtron:\n  capacity:\n    max_percent: 2e1\n")
    cfg = load_config(str(path), ["hashtron.alerts.stagnation_tolerance=1e-9"])
    assert cfg.hashtron.capacity.max_percent == 20.0
    assert cfg.hashtron.alerts.stagnation_tolerance == 1e-9
    assert load_config("smoke", ["optimizer.lr=3E-4"]).optimizer.lr == 3e-4
    assert apply_overrides({}, ["run.name=1e5x"])["run"]["name"] == "1e5x"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("536870912", 536870912), ("512MiB", 512 << 20), ("1.5GiB", 3 << 29), ("2 GB", 2 * 10**9),
     ("1e9", 10**9), ("auto", "auto")],
)
def test_a_memory_budget_takes_a_size_with_a_unit(value: str, expected: int | str) -> None:
    cfg = load_config(None, ["strategy.name=streaming", f"strategy.memory_budget={value}"])
    assert cfg.strategy.memory_budget == expected


@pytest.mark.parametrize("value", ["512mb", "0B", "-1", "1.5", "lots", "true"])
def test_a_memory_budget_without_a_known_unit_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"strategy\.memory_budget: got"):
        load_config(None, ["strategy.name=streaming", f"strategy.memory_budget={value}"])


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["job=hashtron", "training.max_steps=50"], "training.max_steps"),
        (["job=lattice", "model.d_model=128", "data.seq_len=64"], "model.d_model, data.seq_len"),
        (["job=nca", "objectives.cot.path=examples"], "objectives.cot.path"),
        (["job=lm", "lattice.depth=3"], "lattice.depth"),
    ],
)
def test_a_setting_the_job_never_reads_is_refused(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=f"does not read {named}: a value set there changes"):
        load_config(None, overrides)


@pytest.mark.parametrize("job", ["lm", "hashtron", "lattice", "nca"])
def test_a_run_snapshot_loads_again_as_a_config(job: str, tmp_path: Path) -> None:
    # An export's config.yaml is the snapshot; resolving must not touch unread sections.
    resolved = resolve_config(load_config(None, [f"job={job}"]))
    (tmp_path / "config.yaml").write_text(resolved.to_yaml())
    assert load_config(str(tmp_path / "config.yaml")).fingerprint() == resolved.fingerprint()


def test_unread_sections_left_at_their_defaults_pass() -> None:
    for name in ("hashtron", "lattice", "nca", "smoke", "default", "streaming"):
        load_config(name)
    # A setting equal to its default is harmless, and a run's snapshot is not re-checked.
    load_config(None, ["job=hashtron", f"training.max_steps={Config().training.max_steps}"])


def test_resolve_pins_threads_and_device() -> None:
    cfg = resolve_config(Config())
    assert isinstance(cfg.hardware.threads, int) and cfg.hardware.threads >= 1
    assert cfg.hardware.device in ("cpu", "cuda")


@pytest.mark.parametrize(("cpus", "ranks", "threads"), [(8, None, 8), (8, "2", 4), (2, "4", 1)])
def test_auto_threads_share_the_cpus_among_the_ranks_on_the_machine(
    monkeypatch: pytest.MonkeyPatch, cpus: int, ranks: str | None, threads: int
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    if ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:  # as torchrun sets it in each worker
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
    assert resolve_config(Config()).hardware.threads == threads


def test_resolve_makes_relative_file_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run resumed from another folder must read the same files and the same chunk store."""
    monkeypatch.chdir(tmp_path)
    for name, overrides, read in [
        ("streaming", ["strategy.store_dir=store", "data.cache_dir=cache",
                       "data.sources=[{root: src}]", "objectives.cot.path=cot.jsonl"],
         lambda c: [c.strategy.store_dir, c.data.cache_dir, c.data.sources[0].root,
                    c.objectives.cot.path]),
        ("lattice", ["lattice.dialogue_path=pairs.jsonl", "lattice.cache_dir=emb"],
         lambda c: [c.lattice.dialogue_path, c.lattice.cache_dir]),
        ("nca", ["nca.target=flame.png"], lambda c: [c.nca.target]),
        ("hashtron", ["hashtron.task.name=csv", "hashtron.task.options={path: d.csv}"],
         lambda c: [c.hashtron.task.options["path"]]),
    ]:
        resolved = read(resolve_config(load_config(name, overrides)))
        assert all(Path(p).is_absolute() and Path(p).parent == tmp_path for p in resolved)
    # packaged names, home-relative and absent paths stay as written
    kept = resolve_config(load_config("lattice", ["lattice.cache_dir=~/emb"]))
    assert (kept.lattice.dialogue_path, kept.lattice.cache_dir) == ("packaged", "~/emb")
    kept = resolve_config(load_config("default", ["objectives.cot.path=examples"]))
    assert (kept.objectives.cot.path, kept.data.sources[0].root) == ("examples", "stdlib")
    assert resolve_config(load_config("nca")).nca.target == "default"
    assert resolve_config(load_config("streaming")).strategy.store_dir is None


def test_snapshot_round_trips() -> None:
    cfg = resolve_config(load_config("smoke"))
    again = validate_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()


@pytest.mark.parametrize("job", ["lm", "hashtron", "lattice", "nca"])
def test_snapshot_keeps_only_the_running_jobs_section(job: str) -> None:
    snapshot = yaml.safe_load(load_config(None, [f"job={job}"]).to_yaml())
    assert {name for name in JOB_SECTIONS if name in snapshot} == (
        {job} if job in JOB_SECTIONS else set()
    )


BAD_INPUTS = [
    # (raw mapping or override list, fragments the message must contain)
    ({"trainig": {"max_steps": 3}}, ["trainig", "unknown key"]),
    ({"training": {"max_step": 3}}, ["training.max_step", "unknown key"]),
    ({"training": {"max_steps": 0}}, ["training.max_steps", "got 0", "greater than or equal to 1"]),
    ({"training": {"max_steps": "ten"}}, ["training.max_steps", "'ten'", "integer"]),
    ({"training": {"micro_batch_size": -4}}, ["training.micro_batch_size", "got -4"]),
    ({"training": {"grad_accum_steps": 1.5}}, ["training.grad_accum_steps", "1.5"]),
    ({"hardware": {"device": "tpu"}}, ["hardware.device", "'tpu'", "'cpu'", "'cuda'", "'auto'"]),
    ({"hardware": {"threads": 0}}, ["hardware.threads", "got 0"]),
    ({"precision": {"dtype": "fp8"}}, ["precision.dtype", "'fp8'", "'bf16'"]),
    ({"optimizer": {"name": "adam"}}, ["optimizer.name", "'adam'", "'adamw'", "'sgd'"]),
    ({"optimizer": {"lr": -1e-3}}, ["optimizer.lr", "-0.001", "greater than 0"]),
    ({"model": {"d_model": 100, "n_heads": 3}}, ["model", "divisible by n_heads"]),
    ({"data": {"val_fraction": 1.5}}, ["data.val_fraction", "1.5", "less than 1"]),
    ({"seed": -1}, ["seed", "got -1"]),
    ({"checkpoint": {"keep_last": 0}}, ["checkpoint.keep_last", "got 0"]),
    ({"model": {"dropout": 1.0}}, ["model.dropout", "got 1.0", "less than 1"]),
    ({"data": {"sources": [{"root": "x", "inclde": ["*.py"]}]}}, ["data.sources[0].inclde"]),
    ({"job": "gan"}, ["job", "'gan'", "'lm'", "'hashtron'", "'nca'"]),
    ({"nca": {"rollout_min": 97}}, ["nca.rollout_min (97) must be <= nca.rollout_max (96)"]),
    ({"schedule": {"name": "exp"}}, ["schedule.name", "'step'"]),
    ({"hashtron": {"pipeline": {"epochs": 0}}}, ["hashtron.pipeline.epochs", "got 0", ">= 1"]),
    ({"hashtron": {"pipeline": {"epochs": True}}}, ["hashtron.pipeline.epochs", "true/false"]),
    # true/false where a number belongs would silently read as 1/0 (every_steps: 0 = never)
    ({"checkpoint": {"every_steps": False}}, ["checkpoint.every_steps", "got False",
                                              "a number, not true/false"]),
    ({"strategy": {"memory_budget": True}}, ["strategy.memory_budget", "not true/false"]),
    ({"model": {"dropout": True}}, ["model.dropout", "not true/false"]),
    # a count that may be 'auto' is one problem, in words, whatever the bad value
    ({"strategy": {"memory_budget": "64mb"}}, ["(1 problem)", "strategy.memory_budget: got "
                                               "'64mb'; expected a whole number of bytes >= 1"]),
    ({"hardware": {"threads": "2x"}}, ["(1 problem)", "hardware.threads: got '2x'; expected a "
                                       "whole number >= 1 or 'auto'"]),
    ({"hardware": {"threads": 0}}, ["(1 problem)", "hardware.threads: got 0"]),
    ({"optimizer": {"betas": [1.0, 0.99]}}, ["optimizer.betas[0]", "got 1.0", "less than 1"]),
    ({"objectives": {"weights": {"next_token": 0}}},
     ["every token would have loss weight 0", "objectives.weights.next_token"]),
    ({"job": "lattice", "lattice": {"depth": 1}},
     ["lattice.depth", "got 1", "greater than or equal to 2"]),
    ({"job": "lattice", "lattice": {"pool_size": 4}},
     ["lattice.pool_size (4) must be at least the batch"]),
    ({"strategy": {"name": "streaming"}, "optimizer": {"name": "adamw8bit"}},
     ["streaming", "not adamw8bit", "set optimizer.name: adamw or sgd"]),
    ({"hashtron": {"pipeline": {"direction": "up"}}}, ["hashtron.pipeline.direction", "'up'",
                                                       "'backward'", "'forward'"]),
    ({"hashtron": {"capacity": {"max_change_factor": 0.5}}},
     ["hashtron.capacity.max_change_factor", "0.5", "factor >= 1"]),
    ({"hashtron": {"gold_zone": {"noise_scale": 0.2}}}, ["hashtron.gold_zone.moderate_low_scale",
                                                         "<= 0.2"]),
    ({"hashtron": {"task": {"eval_fraction": "half"}}}, ["hashtron.task.eval_fraction", "'half'"]),
    ({"hashtron": {"cache": {"keep_lats": 3}}}, ["hashtron.cache.keep_lats", "unknown key"]),
    ({"hashtron": {"layers": []}}, ["hashtron.layers", "at least 1 item"]),
]


@pytest.mark.parametrize(("raw", "fragments"), BAD_INPUTS)
def test_bad_values_name_key_value_and_expectation(raw: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_a_section_check_names_its_key_path_once() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"hashtron": {"pipeline": {"epochs": 0}}})
    assert str(info.value).splitlines()[1] == (
        "  hashtron.pipeline.epochs: got 0, expected a value >= 1"
    )


def test_hashtron_section_mirrors_the_hashtron_settings() -> None:
    schema = {
        key: field.get_default(call_default_factory=True)
        for key, field in leaf_fields(Config)
        if key.startswith("hashtron.")
    }
    documented = {key: default for key, default, _ in settings_table()}
    assert schema == documented
    docs = {key: doc for key, _, doc in settings_table()}
    assert {key: f.description for key, f in leaf_fields(Config) if key in docs} == docs
    assert Config().hashtron.to_settings() == HashtronSettings()
    cfg = load_config(None, ["hashtron.task.options.n=64", "hashtron.pipeline.epochs=2",
                             "hashtron.task.name=squareroot", "job=hashtron"])
    settings = cfg.hashtron.to_settings()
    assert settings.task.options == {"n": 64} and settings.pipeline.epochs == 2


def test_several_problems_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"seed": "x", "training": {"max_steps": 0}})
    assert "2 problems" in str(info.value)
    assert "seed" in str(info.value) and "training.max_steps" in str(info.value)


def test_unknown_override_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, ["training.max_stesp=3"])
    message = str(info.value)
    assert "training.max_stesp" in message and "max_steps" in message


def test_an_override_inside_a_list_says_to_set_the_list_whole() -> None:
    with pytest.raises(ConfigError, match=r"data.sources is a list; an override sets it whole"):
        load_config("default", ["data.sources.0.root=/x"])
    sources = load_config("default", ["data.sources=[{root: /x}]"]).data.sources
    assert [s.root for s in sources] == ["/x"]
    with pytest.raises(ConfigError, match=r"hashtron.layers is a list"):
        load_config("hashtron", ["hashtron.layers.0.width=3"])
    with pytest.raises(ConfigError, match=r"model.n_layers is a single value, it has no keys"):
        load_config("default", ["model.n_layers.x=3"])
    options = load_config("hashtron", ["hashtron.task.options.n=64"]).hashtron.task.options
    assert options["n"] == 64  # a free-form mapping takes keys


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        apply_overrides({}, ["training.max_steps"])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_a_folder_given_as_config_file_is_named_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder; pass a YAML file inside it"):
        load_config(str(tmp_path))


def test_unknown_packaged_name() -> None:
    with pytest.raises(ConfigError, match="smoke"):
        load_config("no-such-config")


def test_invalid_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    utf16 = tmp_path / "utf16.yaml"  # what some editors write for "Unicode"
    utf16.write_text("training:\n  max_steps: 3\n", encoding="utf-16")
    with pytest.raises(ConfigError, match=r"utf16\.yaml is not UTF-8 text .*save it as UTF-8"):
        load_config(str(utf16))


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  n_layers: 2\ntraining:\n  max_steps: 3\nmodel:\n  n_layers: 4\n")
    with pytest.raises(ConfigError, match=r"key 'model' appears twice(.|\n)*line 5"):
        load_config(str(twice))


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(str(bad))


def test_readme_documents_every_config_key() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    missing = [key for key, _ in leaf_fields(Config) if f"`{key}`" not in readme]
    assert missing == [], f"README's configuration table lacks {missing}"


def test_packaged_default_is_the_schema_default() -> None:
    assert load_config("default") == Config()


def test_passk_ks_that_no_n_can_estimate_are_refused_before_the_run() -> None:
    # Otherwise training runs to its first evaluation and only then fails.
    with pytest.raises(ConfigError, match=r"eval\.passk: no k in ks \[5\] .* n = 2"):
        load_config("smoke", ["eval.passk.n=2", "eval.passk.ks=[5]"])
    assert load_config("smoke", ["eval.passk.n=2", "eval.passk.ks=[1, 5]"]).eval.passk.ks == [1, 5]


def test_a_relative_passk_problems_file_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kiln eval` and `kiln resume` from another folder must read the same problems."""
    monkeypatch.chdir(tmp_path)
    resolved = resolve_config(load_config("smoke", ["eval.passk.problems=problems.jsonl"]))
    assert resolved.eval.passk.problems == str(tmp_path / "problems.jsonl")
    assert resolve_config(load_config("smoke")).eval.passk.problems == "packaged"
