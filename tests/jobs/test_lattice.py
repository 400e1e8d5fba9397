"""The lattice job end to end: training, logged components, fixed loss weights, byte-exact resume
with the pool, truncated backprop over many steps without memory growth."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln import workflows
from kiln.checkpoint import list_checkpoints, load_checkpoint
from kiln.config import Config, apply_overrides, validate_config
from kiln.data.text_encoders import HashedNgramEncoder
from kiln.errors import CheckpointError, ConfigError, DataError
from kiln.jobs.lattice import COMPONENTS, LatticeJob, lattice_shape
from kiln.models.lattice_adapter import AdaptedLattice, seed_state
from kiln.repro import seed_everything
from kiln.run import read_metrics
from kiln.streaming import store as store_module
from kiln.streaming.export import committed_checkpoint

TINY = {
    "job": "lattice",
    "seed": 3,
    "lattice": {
        "depth": 3, "height": 4, "width": 5, "channels": 4, "memory": 2, "hidden": 8,
        "encoder": "hashed", "encoder_dim": 16, "pool_size": 8, "eval_pairs": 8,
    },
    "optimizer": {"lr": 3e-3, "weight_decay": 0.01},
    "schedule": {"warmup_steps": 2},
    "training": {"max_steps": 20, "micro_batch_size": 4},
    "checkpoint": {"every_steps": 10},
    "eval": {"every_steps": 10},
    "logging": {"every_steps": 5, "progress": False},
    "hardware": {"device": "cpu", "threads": 1},
}


def write_pairs(path: Path, count: int = 24) -> Path:
    words = ["kiln", "clay", "glaze", "ember", "slip", "wheel", "ash", "bisque"]
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            a, b = words[i % 8], words[(3 * i + 1) % 8]
            f.write(json.dumps({"question": f"what joins {a} and {b} {i}?",
                                "answer": f"{b} follows {a} in round {i}"}) + "\n")
    return path


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    base = [
        f"run.root={tmp_path / 'experiments'}",
        f"lattice.cache_dir={tmp_path / 'embeddings'}",
        f"lattice.dialogue_path={write_pairs(tmp_path / 'pairs.jsonl')}",
    ]
    return validate_config(apply_overrides(TINY, [*base, *overrides]))


def make_job(config: Config, tmp_path: Path) -> LatticeJob:
    seed_everything(config.seed)
    return LatticeJob(config, tmp_path, torch.device("cpu"), lambda _msg: None)


def test_tiny_lattice_trains_and_logs_every_component(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "training.max_steps=60", "eval.every_steps=30")
    outcome = workflows.train(cfg, echo=False)
    assert outcome.status == "completed" and outcome.step == 60
    rows = [r for r in read_metrics(outcome.run_dir) if "loss" in r]
    for row in rows:
        parts = [row[f"loss_{name}"] for name in COMPONENTS]
        assert all(torch.isfinite(torch.tensor(parts)))
        # The logged loss is the weighted sum of the logged components (weights 1, 0.1, 1).
        assert row["loss"] == pytest.approx(parts[0] + 0.1 * parts[1] + parts[2], rel=1e-5)
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first
    evals = [r for r in read_metrics(outcome.run_dir) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [30, 60]
    for key in ("val_surface", "val_internal", "val_dialogue", "val_retrieval", "pool_diversity"):
        assert key in evals[-1], key
    assert evals[-1]["pool_diversity"] > 0
    assert outcome.report and "answer retrieval" in outcome.report
    log = (outcome.run_dir / "train.log").read_text()
    assert "60 cells" in log and "parameters in all" in log


def test_loss_weights_are_config_values_not_parameters(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "lattice.loss.surface=2.0", "lattice.loss.internal=0.5",
                      "lattice.loss.dialogue=3.0", "training.max_steps=5")
    job = make_job(cfg, tmp_path)
    assert job.weights == {"surface": 2.0, "internal": 0.5, "dialogue": 3.0}
    names = [name for name, _ in job.model.named_parameters()]
    assert all(name.startswith(("adapter.", "lattice.")) for name in names)
    shape = job.model.lattice.shape
    adapter = sum(p.numel() for p in job.model.adapter.parameters())
    assert job.model.num_parameters() == shape.num_parameters() + adapter
    with torch.no_grad():
        loss, parts = job.loss(job.model, job.batches.next_batch())
    expected = 2.0 * parts["surface"] + 0.5 * parts["internal"] + 3.0 * parts["dialogue"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # Training moves every parameter group but never the weights of the loss.
    outcome = workflows.train(cfg, echo=False)
    snapshot = (outcome.run_dir / "config_snapshot.yaml").read_text()
    assert "surface: 2.0" in snapshot and "dialogue: 3.0" in snapshot
    state, _ = load_checkpoint(list_checkpoints(outcome.run_dir / "checkpoints")[-1].path)
    assert not any("loss" in key for key in state["model"])


def test_the_adapter_is_trained_and_checkpointed(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "training.max_steps=4")
    job = make_job(cfg, tmp_path)
    loss, _ = job.loss(job.model, job.batches.next_batch())
    loss.backward()
    assert job.model.adapter.weight.grad is not None
    assert job.model.adapter.weight.grad.abs().sum() > 0
    outcome = workflows.train(cfg, echo=False)
    state, _ = load_checkpoint(list_checkpoints(outcome.run_dir / "checkpoints")[-1].path)
    assert state["model"]["adapter.weight"].shape == (20, 16)
    bundle = workflows.export_run(outcome.run_dir, tmp_path / "export")
    exported = load_file(bundle / "model.safetensors")
    assert torch.equal(exported["adapter.weight"], state["model"]["adapter.weight"])
    assert not (bundle / "tokenizer.json").exists() and (bundle / "config.yaml").is_file()


def test_the_seed_state_keeps_gradients_finite_through_a_deep_lattice(tmp_path: Path) -> None:
    """From the empty lattice, LayerNorm of all-zero tokens (slope 1/sqrt(eps)) compounds over
    the 10 propagation steps of an 11-deep lattice; the default seed state avoids that."""
    norms = {}
    for scale in (0.0, 1.0):
        cfg = tiny_config(tmp_path, "lattice.depth=11", "lattice.height=3", "lattice.width=3",
                          "lattice.channels=8", f"lattice.seed_scale={scale}")
        job = make_job(cfg, tmp_path)
        loss, _ = job.loss(job.model, job.batches.next_batch())
        loss.backward()
        norms[scale] = torch.sqrt(sum(p.grad.square().sum() for p in job.model.parameters()))
    assert norms[0.0] > 1e6 and norms[1.0] < 1e4, norms


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "overrides",
    [
        ("lattice.fire_rate=1.0",),
        ("lattice.fire_rate=0.5", "lattice.channels_last_3d=false", "precision.dtype=bf16"),
        pytest.param(
            ("optimizer.name=adamw8bit", "lattice.hidden=512"),
            marks=pytest.mark.skipif(not _has_bitsandbytes(), reason="the 'bnb' extra is absent"),
        ),
    ],
    ids=["deterministic", "stochastic-channels-first-bf16", "adamw8bit"],
)
def test_resume_is_byte_exact_including_the_pool(
    tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    cfg = tiny_config(tmp_path, *overrides)
    straight = workflows.train(cfg, echo=False).run_dir
    broken = workflows.train(cfg, echo=False).run_dir
    shutil.rmtree(broken / "checkpoints" / "step_00000020")  # died after step 10 was saved
    (broken / "status").write_text("interrupted\n")
    assert workflows.resume(broken, echo=False).status == "completed"
    a, _ = load_checkpoint(straight / "checkpoints" / "step_00000020")
    b, _ = load_checkpoint(broken / "checkpoints" / "step_00000020")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    pool_a, pool_b = a["loader"], b["loader"]
    assert torch.equal(pool_a["states"], pool_b["states"])
    torch.testing.assert_close(pool_a["losses"], pool_b["losses"], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(pool_a["generator"], pool_b["generator"])
    assert (pool_a["epoch"], pool_a["position"]) == (pool_b["epoch"], pool_b["position"])
    assert pool_a["states"].abs().sum() > 0  # the pool really holds trained states
    rows_a = [r["loss"] for r in read_metrics(straight) if "loss" in r]
    rows_b = [r["loss"] for r in read_metrics(broken) if "loss" in r]
    assert rows_a == rows_b


def test_micro_batching_does_not_change_a_stochastic_step(tmp_path: Path) -> None:
    """Each sample's fire masks come from its own seed: a batch of 8 as one micro-batch, as 4 x 2
    accumulation or as 1 x 8 trains the same (up to the order of float sums)."""
    runs = {}
    for micro, accum in ((8, 1), (4, 2), (1, 8)):
        cfg = tiny_config(
            tmp_path, "lattice.fire_rate=0.7", "training.max_steps=3",
            f"training.micro_batch_size={micro}", f"training.grad_accum_steps={accum}",
            "checkpoint.every_steps=3", "eval.every_steps=3", "logging.every_steps=1",
        )
        outcome = workflows.train(cfg, echo=False)
        state, _ = load_checkpoint(list_checkpoints(outcome.run_dir / "checkpoints")[-1].path)
        losses = [r["loss"] for r in read_metrics(outcome.run_dir) if "loss" in r]
        runs[micro] = (state, losses, outcome.final_eval["val_loss"])
    whole, whole_losses, whole_val = runs[8]
    for micro in (4, 1):
        state, losses, val = runs[micro]
        assert losses == pytest.approx(whole_losses, rel=1e-5), micro
        assert val == pytest.approx(whole_val, rel=1e-5), micro
        for key, tensor in whole["model"].items():
            torch.testing.assert_close(state["model"][key], tensor, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(state["loader"]["states"], whole["loader"]["states"],
                                   rtol=1e-4, atol=1e-5)


def test_the_final_report_evaluates_under_the_training_precision(tmp_path: Path) -> None:
    """Under bf16 the report repeats the last in-training evaluation of the same step."""
    cfg = tiny_config(tmp_path, "precision.dtype=bf16", "training.max_steps=10")
    outcome = workflows.train(cfg, echo=False)
    val = outcome.final_eval
    assert val["step"] == 10
    expected = (
        f"held-out: loss {val['val_loss']:.4f} (surface {val['val_surface']:.4f}, "
        f"internal {val['val_internal']:.4f}, dialogue {val['val_dialogue']:.4f})"
    )
    assert outcome.report is not None and outcome.report.startswith(expected), outcome.report


def test_evaluation_runs_in_batches_of_eval_batch_size(tmp_path: Path) -> None:
    """eval.batch_size (default: the micro-batch) sets the evaluation's batches; a sample's
    results do not depend on the batch it runs in."""
    results = {}
    for size in ("null", "3"):
        overrides = ("lattice.val_fraction=0.5", "lattice.fire_rate=0.5", f"eval.batch_size={size}")
        cfg = tiny_config(tmp_path, *overrides)
        job = make_job(cfg, tmp_path)
        seen: list[int] = []
        job.model.register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.append(args[0].shape[0])
        )
        results[size] = job.evaluate(job.model)
        assert seen == ([4, 4] if size == "null" else [3, 3, 2]), seen
    assert results["3"]["val_loss"] == pytest.approx(results["null"]["val_loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("lattice.sharing=some", ["lattice.sharing", "'some'", "'per_depth'"]),
        ("lattice.fire_rate=0", ["lattice.fire_rate", "greater than 0"]),
        ("lattice.loss.internal=-1", ["lattice.loss.internal", "greater than or equal to 0"]),
        ("lattice.encoder=bert", ["lattice.encoder", "'minilm'", "'hashed'"]),
    ],
)
def test_bad_lattice_settings_name_the_key(
    tmp_path: Path, override: str, fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, override)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_too_few_training_pairs_name_every_setting_that_decides_it(tmp_path: Path) -> None:
    # 24 pairs, 22 held out: 2 left to train on, a step needs 4 x 2.
    cfg = tiny_config(tmp_path, "lattice.val_fraction=0.9", "training.grad_accum_steps=2")
    with pytest.raises(DataError) as err:
        make_job(cfg, tmp_path)
    for fragment in (
        "pairs.jsonl",
        "2 training pairs",
        "lattice.val_fraction 0.9 of 24",
        "batch of 8",
        "training.micro_batch_size x grad_accum_steps",
    ):
        assert fragment in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ({"steps": 1}, "lattice.steps 1 is fewer than lattice.depth - 1 (2)"),
        ({"channels": 1}, "set lattice.channels to 2 or more"),
    ],
)
def test_settings_that_cut_the_question_from_the_answer_are_refused(
    tmp_path: Path, setting: dict[str, int], fragment: str
) -> None:
    """Either setting gives a lattice whose output is the same for every question."""
    unchecked = tiny_config(tmp_path).lattice.model_copy(update=setting)  # skips validation
    job_shape = lattice_shape(unchecked)
    model = AdaptedLattice(job_shape, 16)
    state = seed_state(job_shape, 1.0).expand(2, *seed_state(job_shape, 1.0).shape)
    outputs = model(torch.randn(2, 16), state).output
    assert torch.equal(outputs[0], outputs[1])  # the failure the check prevents
    (key, value), = setting.items()
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        tiny_config(tmp_path, f"lattice.{key}={value}")


def test_a_periodic_boundary_lets_fewer_steps_reach_the_back_face(tmp_path: Path) -> None:
    # The back face neighbours the front face across the periodic boundary.
    cfg = tiny_config(tmp_path, "lattice.steps=1", "lattice.boundary=periodic")
    assert make_job(cfg, tmp_path).model.lattice.shape.num_steps == 1


def _memory_rows(tmp_path: Path, steps: int) -> list[dict]:
    """Train ``steps`` steps on a lattice big enough that a leaked graph per step would show."""
    cfg = tiny_config(
        tmp_path, "lattice.depth=4", "lattice.height=6", "lattice.width=6", "lattice.channels=8",
        "lattice.hidden=32", "lattice.fire_rate=0.5", f"training.max_steps={steps}",
        "checkpoint.every_steps=0", "eval.every_steps=0", "logging.every_steps=25",
    )
    outcome = workflows.train(cfg, echo=False)
    assert outcome.status == "completed" and outcome.step == steps
    return [r for r in read_metrics(outcome.run_dir) if "loss" in r]


def _assert_flat_memory(rows: list[dict]) -> None:
    # One step's autograd graph here is a few MB; keeping the graphs (state not detached) would
    # grow memory by that much every step, and backward would fail on the second step anyway.
    after_warmup = rows[len(rows) // 4]["memory_bytes"]
    assert max(r["memory_bytes"] for r in rows) - after_warmup < 48 * 2**20
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_many_consecutive_steps_without_memory_growth(tmp_path: Path) -> None:
    _assert_flat_memory(_memory_rows(tmp_path, 200))


@pytest.mark.slow
def test_thousand_consecutive_steps_without_memory_growth(tmp_path: Path) -> None:
    _assert_flat_memory(_memory_rows(tmp_path, 1000))


@pytest.mark.cuda
def test_cuda_lattice_training_is_deterministic_and_resumes(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "hardware.device=cuda", "precision.dtype=bf16",
                      "lattice.fire_rate=0.5")
    a = workflows.train(cfg, echo=False).run_dir
    b = workflows.train(cfg, echo=False).run_dir
    shutil.rmtree(b / "checkpoints" / "step_00000020")
    (b / "status").write_text("interrupted\n")
    workflows.resume(b, echo=False)
    sa, _ = load_checkpoint(a / "checkpoints" / "step_00000020")
    sb, _ = load_checkpoint(b / "checkpoints" / "step_00000020")
    assert all(torch.equal(t, sb["model"][k]) for k, t in sa["model"].items())
    assert torch.equal(sa["loader"]["states"], sb["loader"]["states"])


def test_cache_misses_and_hits_give_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class RandomDrawingEncoder:
        """A teacher that, like a model being loaded, draws from the global RNG."""

        name, dim = "draws-v1", 16

        def encode(self, texts: list[str]) -> torch.Tensor:
            torch.rand(1000)
            return HashedNgramEncoder(16).encode(texts)

    from kiln.jobs import lattice as lattice_job

    cfg = tiny_config(tmp_path, "training.max_steps=5")
    monkeypatch.setattr(lattice_job, "build_encoder", lambda *_: RandomDrawingEncoder())
    miss = workflows.train(cfg, echo=False).run_dir
    hit = workflows.train(cfg, echo=False).run_dir
    assert "0 hits" in (miss / "train.log").read_text()
    assert "0 misses" in (hit / "train.log").read_text()
    a, _ = load_checkpoint(list_checkpoints(miss / "checkpoints")[-1].path)
    b, _ = load_checkpoint(list_checkpoints(hit / "checkpoints")[-1].path)
    assert all(torch.equal(t, b["model"][k]) for k, t in a["model"].items())


STREAMED = ("strategy.name=streaming", "strategy.memory_budget=400000")  # below the state


def _last_state(config: Config, run: Path) -> dict:
    """The model and pool of the run's last checkpoint (a streamed run's last commit)."""
    streamed = committed_checkpoint(config, run)
    if streamed is not None:
        return streamed[1]
    return load_checkpoint(list_checkpoints(run / "checkpoints")[-1].path)[0]


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("lattice.fire_rate=0.5", "lattice.alive_threshold=0.05",
         "training.micro_batch_size=2", "training.grad_accum_steps=2"),
        ("lattice.sharing=all", "lattice.inject=every_step"),
        ("lattice.sharing=per_depth", "strategy.memory_budget=100000000"),
    ],
    ids=["per-cell", "stochastic-alive-accum", "shared-every-step", "per-depth-resident"],
)
def test_a_streamed_lattice_trains_like_in_memory(
    tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    """Out of core, one depth slice of one propagation step at a time: the same losses, weights
    and pool as in memory, up to the order of float sums (the slices' gradients are summed
    chunk by chunk)."""
    common = ("training.max_steps=6", "checkpoint.every_steps=6", "eval.every_steps=6",
              "logging.every_steps=1")
    memory_cfg = tiny_config(tmp_path, *common, *overrides)
    streamed_cfg = tiny_config(tmp_path, *common, *STREAMED, *overrides)
    memory = workflows.train(memory_cfg, echo=False).run_dir
    streamed = workflows.train(streamed_cfg, echo=False).run_dir
    log = (streamed / "train.log").read_text()
    assert "streaming: 8 chunks" in log  # input, 2 steps x 3 slices, output
    assert ("resident" in log) == ("strategy.memory_budget=100000000" in overrides)
    a, b = _last_state(memory_cfg, memory), _last_state(streamed_cfg, streamed)
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(b["loader"]["states"], a["loader"]["states"], rtol=1e-5, atol=1e-5)
    rows = [[r["loss"] for r in read_metrics(run) if "loss" in r] for run in (memory, streamed)]
    assert rows[1] == pytest.approx(rows[0], rel=1e-5)


def test_a_streamed_lattice_resumes_byte_exact_including_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, *STREAMED, "training.max_steps=6", "lattice.fire_rate=0.5")
    straight = workflows.train(cfg, echo=False).run_dir
    real_write = store_module.write_part

    def disk_full_at_step_4(path: Path, tensors: dict, **options: object) -> object:
        if ".v00000004." in path.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, tensors, **options)

    monkeypatch.setattr(store_module, "write_part", disk_full_at_step_4)
    with pytest.raises(CheckpointError, match="Free disk space"):
        workflows.train(cfg, echo=False)
    monkeypatch.setattr(store_module, "write_part", real_write)
    (broken,) = [p for p in Path(cfg.run.root).iterdir() if p != straight]
    assert workflows.resume(broken, echo=False).status == "completed"
    a, b = _last_state(cfg, straight), _last_state(cfg, broken)
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert torch.equal(a["loader"]["states"], b["loader"]["states"])
    assert torch.equal(a["loader"]["generator"], b["loader"]["generator"])
