"""The LM job's loss: every objective from one forward pass, weighted exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kiln import workflows
from kiln.config import Config, load_config
from kiln.data.mixture import normalize_step
from kiln.data.objectives import COMPONENTS, COT, FIM, NEXT_TOKEN
from kiln.errors import ConfigError, DataError
from kiln.jobs.lm import step_split, weighted_token_loss
from kiln.jobs.lm_sampling import NonFiniteWeights
from kiln.models.gpt import GPT, GPTShape
from kiln.run import list_runs


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTShape(vocab_size=50, context=16, n_layers=1, n_heads=2, d_model=16,
                        mlp_ratio=2, dropout=0.0, bias=True, layernorm_eps=1e-5, init_std=0.02))


def test_all_components_come_from_one_forward_pass() -> None:
    model = tiny_gpt()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (6, 13), generator=g)
    components = torch.tensor([NEXT_TOKEN, FIM, COT]).repeat_interleave(4).repeat(6, 1)
    weights = torch.rand(6, 12, generator=g)
    weights[:, :2] = 0.0  # untrained positions, like padding or CoT prompts
    batch = normalize_step({"tokens": tokens, "weights": weights, "components": components})

    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    loss, parts = weighted_token_loss(model, batch)
    assert len(calls) == 1
    assert set(parts) == set(COMPONENTS)

    with torch.no_grad():
        logits = model(tokens[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1), reduction="none")
    ce = ce.view(6, 12)
    expected = float((ce * weights).sum() / weights.sum())
    assert loss.detach().item() == pytest.approx(expected, rel=1e-5)
    for index, name in enumerate(COMPONENTS):
        trained = (components == index) & (weights > 0)
        assert parts[name].item() == pytest.approx(float(ce[trained].mean()), rel=1e-5)
    loss.backward()
    assert model.tok_emb.weight.grad is not None


def test_components_absent_from_a_batch_are_not_reported() -> None:
    tokens = torch.randint(0, 50, (2, 9))
    batch = normalize_step({"tokens": tokens, "weights": torch.ones(2, 8),
                            "components": torch.full((2, 8), COT)})
    _, parts = weighted_token_loss(tiny_gpt(), batch)
    assert set(parts) == {"cot"}


def test_step_split_between_corpus_and_cot() -> None:
    assert step_split(load_config("smoke")) == (8, 0)
    cfg = load_config("smoke", ["objectives.cot.path=examples", "objectives.cot.fraction=0.25"])
    assert step_split(cfg) == (6, 2)
    tiny = load_config("smoke", ["objectives.cot.path=examples", "training.micro_batch_size=1"])
    with pytest.raises(ConfigError, match="leaves no corpus windows"):
        step_split(tiny)


def _cot_file(tmp_path: Path, records: int) -> Path:
    """The first ``records`` lines of the packaged CoT set, as a user's file."""
    packaged = Path(__file__).parents[2] / "src/kiln/data/examples/cot_python.jsonl"
    path = tmp_path / "cot.jsonl"
    path.write_text("".join(packaged.read_text().splitlines(keepends=True)[:records]))
    return path


def test_too_few_cot_records_name_the_cot_file(smoke_config: Callable[..., Config],
                                               tmp_path: Path) -> None:
    cot = _cot_file(tmp_path, 2)
    config = smoke_config("training.max_steps=1", f"objectives.cot.path={cot}")
    with pytest.raises(DataError, match=rf"the chain-of-thought training records \({cot}\) has"):
        workflows.train(config, echo=False)


def test_cot_val_records_too_short_for_a_window_are_reported(
    smoke_config: Callable[..., Config], tmp_path: Path
) -> None:
    cot = _cot_file(tmp_path, 40)
    config = smoke_config("training.max_steps=1", f"objectives.cot.path={cot}",
                          "objectives.cot.val_fraction=0.025",  # one record held out
                          "data.seq_len=256")
    run = workflows.train(config, echo=False).run_dir
    assert "no val_cot_loss is reported; add records" in (run / "train.log").read_text()


def _code_corpus(root: Path, files: int = 12) -> Path:
    """A user's folder of small Python modules (enough tokens for the smoke config's windows)."""
    root.mkdir(parents=True)
    for i in range(files):
        lines = [f"def func_{i}_{j}(x, y):\n    return x * {j} + y - {i}\n\n" for j in range(30)]
        (root / f"mod_{i:02d}.py").write_text("".join(lines), encoding="utf-8")
    return root


def test_resume_on_an_edited_corpus_is_refused(smoke_config: Callable[..., Config],
                                               tmp_path: Path) -> None:
    corpus = _code_corpus(tmp_path / "src")
    config = smoke_config("training.max_steps=2", "checkpoint.every_steps=1",
                          f"data.sources=[{{root: {corpus}}}]", f"data.cache_dir={tmp_path}/c",
                          "data.tokenizer.train_bytes=2000")  # mod_11 stays out of it
    run = workflows.train(config, echo=False).run_dir
    (run / "status").write_text("interrupted\n")
    edited = corpus / "mod_11.py"
    # Two functions swap their constants: the same tokens elsewhere, so the same tokenizer and
    # number of windows; only the content tells the data apart.
    swapped = edited.read_text().replace("x * 0 +", "x * T +").replace("x * 1 +", "x * 0 +")
    edited.write_text(swapped.replace("x * T +", "x * 1 +"), encoding="utf-8")
    with pytest.raises(DataError, match=r"for the code corpus does not fit .*data: saved"):
        workflows.resume(run, echo=False)


def test_a_val_split_shorter_than_a_window_is_a_clear_error(
    smoke_config: Callable[..., Config], tmp_path: Path
) -> None:
    corpus = _code_corpus(tmp_path / "src")
    (corpus / "zz_tiny.py").write_text("x = 1\n")  # last in order: the held-out document
    config = smoke_config(f"data.sources=[{{root: {corpus}}}]", f"data.cache_dir={tmp_path}/c",
                          "data.val_fraction=0.0001")
    with pytest.raises(DataError, match=r"val split .* fewer than one window of seq_len \+ 1"):
        workflows.train(config, echo=False)
    assert not list(Path(config.run.root).iterdir())  # the failed run leaves no directory


def test_evaluating_a_run_whose_corpus_changed_its_tokenizer_is_refused(
    smoke_config: Callable[..., Config], tmp_path: Path
) -> None:
    corpus = _code_corpus(tmp_path / "src")
    config = smoke_config("training.max_steps=1", f"data.sources=[{{root: {corpus}}}]",
                          f"data.cache_dir={tmp_path}/c")
    run = workflows.train(config, echo=False).run_dir
    for i in range(4):  # new words: the tokenizer trained on the corpus now differs
        (corpus / f"new_{i}.py").write_text(f"class Widget{i}(Base):\n    name = 'qwerty'\n" * 50)
    with pytest.raises(DataError, match=r"another tokenizer .* than the one this run trained"):
        workflows.evaluate_run(run)


def test_a_diverged_run_ends_with_its_summary_and_refuses_to_sample(
    smoke_config: Callable[..., Config],
) -> None:
    config = smoke_config("training.max_steps=3", "optimizer.lr=1e6", "training.grad_clip=0")
    outcome = workflows.train(config, echo=False)
    assert outcome.status == "completed" and outcome.report is not None
    assert outcome.report.startswith("sample: none: the model's weights are not finite")
    assert json.loads((outcome.run_dir / "metrics.json").read_text())["step"] == 3
    with pytest.raises(NonFiniteWeights, match="training diverged"):
        workflows.generate(outcome.run_dir, "def ", max_new_tokens=2)


def _refuse_non_standard(token: str) -> None:
    raise ValueError(f"non-standard JSON token {token}")


def test_a_diverged_run_writes_strict_json_with_null_for_each_nan(
    smoke_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = smoke_config("training.max_steps=3", "optimizer.lr=1e6", "training.grad_clip=0",
                          "logging.every_steps=1")
    run = workflows.train(config, echo=False).run_dir
    bundle = workflows.export_run(run, tmp_path / "bundle")
    written = [*run.rglob("*.json"), *run.rglob("*.jsonl"), bundle / "metadata.json"]
    assert {p.name for p in written} >= {"metrics.json", "metrics.jsonl", "00000003.json",
                                         "manifest.json", "state.json", "metadata.json"}
    for path in written:  # jq, JavaScript and log tools refuse NaN and Infinity
        text = path.read_text()
        for document in text.splitlines() if path.suffix == ".jsonl" else [text]:
            json.loads(document, parse_constant=_refuse_non_standard)

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses[0] is not None and None in losses  # finite at step 1, then diverged
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["best_loss"] == losses[0] and summary["final_loss"] is None
    # An evaluation whose loss was NaN scores no checkpoint: "best" exports the latest.
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["selected_by"] == "latest" and metadata["val_loss"] is None
    assert list_runs(run.parent)[0]["loss"] is None  # `kiln runs` shows "-"
