"""Optimizer construction, the lr schedule and the L2/L1 objective terms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.config import OptimizerSection, ScheduleSection
from kiln.engine.optim import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    normalize_gradients,
    regularization_terms,
)
from kiln.errors import ConfigError


def test_warmup_then_cosine_to_min() -> None:
    cfg = ScheduleSection(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg=cfg, max_steps=110) == pytest.approx(0.1)
    assert lr_factor(9, cfg=cfg, max_steps=110) == pytest.approx(1.0)
    assert lr_factor(10, cfg=cfg, max_steps=110) == pytest.approx(1.0)
    assert lr_factor(60, cfg=cfg, max_steps=110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg=cfg, max_steps=110) == pytest.approx(0.1)
    assert lr_factor(500, cfg=cfg, max_steps=110) == pytest.approx(0.1)


def test_linear_and_constant() -> None:
    lin = ScheduleSection(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(50, cfg=lin, max_steps=100) == pytest.approx(0.5)
    const = ScheduleSection(name="constant", warmup_steps=2, min_lr_ratio=0.0)
    assert lr_factor(1, cfg=const, max_steps=100) == pytest.approx(1.0)
    assert lr_factor(99, cfg=const, max_steps=100) == 1.0


def test_step_schedule_multiplies_at_each_milestone() -> None:
    cfg = ScheduleSection(name="step", warmup_steps=0, milestones=[300, 100], gamma=0.5)
    factors = [lr_factor(s, cfg=cfg, max_steps=400) for s in (0, 99, 100, 299, 300, 399)]
    assert factors == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    warm = ScheduleSection(name="step", warmup_steps=4, milestones=[2], gamma=0.1)
    assert lr_factor(1, cfg=warm, max_steps=10) == pytest.approx(0.5)  # warmup first
    assert lr_factor(4, cfg=warm, max_steps=10) == pytest.approx(0.1)
    no_milestones = ScheduleSection(name="step", warmup_steps=0)
    assert lr_factor(9, cfg=no_milestones, max_steps=10) == 1.0


def test_normalize_gradients_gives_every_tensor_unit_norm() -> None:
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), 100.0)
    model.bias.grad = torch.tensor([3e-6, -4e-6])
    normalize_gradients(model.parameters())
    assert model.weight.grad.norm().item() == pytest.approx(1.0)
    assert torch.allclose(model.bias.grad, torch.tensor([0.6, -0.8]), atol=1e-2)
    frozen = nn.Linear(2, 2)
    normalize_gradients(frozen.parameters())  # no gradients: nothing to do
    assert frozen.weight.grad is None


def test_scheduler_state_round_trips() -> None:
    model = nn.Linear(3, 3)
    opt = build_optimizer(model, OptimizerSection(lr=0.5))
    sched = build_scheduler(opt, ScheduleSection(warmup_steps=4), max_steps=20)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(model, OptimizerSection(lr=0.5))
    sched2 = build_scheduler(opt2, ScheduleSection(warmup_steps=4), max_steps=20)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr() == [0.5 * 4 / 4] * 2


def test_weight_decay_only_on_matrices() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model, OptimizerSection(weight_decay=0.3))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.3 and all(p.ndim == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])
    assert isinstance(opt, torch.optim.AdamW)
    sgd = build_optimizer(model, OptimizerSection(name="sgd", momentum=0.8, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_cpu_parameters_get_the_fused_kernel(name: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(model, OptimizerSection(name=name))
    assert all(group["fused"] for group in optimizer.param_groups)


def test_parameters_on_another_device_leave_torch_its_own_choice() -> None:
    optimizer = build_optimizer(nn.Linear(4, 4, device="meta"), OptimizerSection())
    assert not any(group["fused"] for group in optimizer.param_groups)


def test_regularization_terms_exact_values() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.fill_(3.0)
    assert regularization_terms(model, OptimizerSection()) == {}
    terms = regularization_terms(model, OptimizerSection(l2=0.5, l1=0.25))
    assert terms["l2"].item() == pytest.approx(0.5 * (1 + 4 + 9))
    assert terms["l1"].item() == pytest.approx(0.25 * (1 + 2 + 3))


def test_l2_gradient_is_two_lambda_theta() -> None:
    model = nn.Linear(2, 1, bias=False)
    terms = regularization_terms(model, OptimizerSection(l2=0.1))
    terms["l2"].backward()
    assert torch.allclose(model.weight.grad, 0.2 * model.weight.detach())


def _tiny_lattice() -> nn.Module:
    from kiln.models.lattice import Lattice, LatticeShape

    torch.manual_seed(0)
    return Lattice(LatticeShape(depth=2, height=2, width=3, channels=4, memory=2, hidden=8,
                                input_dim=6, output_dim=6))


def test_stacked_per_cell_vectors_are_not_decayed() -> None:
    model = _tiny_lattice()
    opt = build_optimizer(model, OptimizerSection(weight_decay=0.1))
    decayed, plain = ({id(p) for p in g["params"]} for g in opt.param_groups)
    cell = model.cell
    for matrix in (cell.value_w, cell.gate_w, cell.mix_w, cell.down_w, cell.mem_in):
        assert id(matrix) in decayed
    # (cells, C) stacks of LayerNorm gains and biases have 2 dims but are vectors per cell.
    for vector in (cell.norm_w, cell.value_b, cell.gate_norm_w, cell.mix_b, model.write_w):
        assert vector.ndim == 2 and id(vector) in plain
    assert len(decayed) + len(plain) == len(list(model.parameters()))


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def test_adamw8bit_without_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_bnb(name: str, *args: object, **kwargs: object) -> object:
        if name == "bitsandbytes":
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ConfigError, match=r"kiln-train\[bnb\]"):
        build_optimizer(nn.Linear(2, 2), OptimizerSection(name="adamw8bit"))


@pytest.mark.skipif(not _has_bitsandbytes(), reason="bitsandbytes (the 'bnb' extra) is absent")
def test_adamw8bit_keeps_8bit_state_for_big_tensors_and_round_trips() -> None:
    def run(
        steps: int, start: int = 0, state: dict | None = None
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 4))
        opt = build_optimizer(model, OptimizerSection(name="adamw8bit", weight_decay=0.01))
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        for i in range(start, start + steps):
            gen = torch.Generator().manual_seed(i)
            loss = model(torch.randn(8, 128, generator=gen)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    model, opt = run(3)
    big = opt.state[model[0].weight]  # 8192 elements: quantised; the small ones stay 32-bit
    assert big["state1"].dtype == torch.uint8 and big["state2"].dtype == torch.uint8
    state = {"model": model.state_dict(), "opt": opt.state_dict()}
    # Resuming from the state dict is bit-exact: 3 + 2 steps equal 5 straight steps.
    resumed, _ = run(2, start=3, state=state)
    straight, _ = run(5)
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)
