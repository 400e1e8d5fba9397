"""The memory budget: auto, per-chunk needs measured on the meta device, the check's error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.errors import ConfigError
from kiln.models.gpt import GPT, GPTShape
from kiln.streaming import budget as budget_module
from kiln.streaming.budget import ChunkNeeds, check_budget, measure_needs, resolve_budget
from kiln.streaming.chunks import build_plan


def test_auto_is_half_the_available_ram_and_bytes_pass_through() -> None:
    assert resolve_budget(12345, torch.device("cpu")) == 12345
    available = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemAvailable:")
    )
    assert resolve_budget("auto", torch.device("cpu")) == pytest.approx(available / 2, rel=0.1)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_auto_is_half_of_what_a_containers_memory_limit_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    # A 1 GiB limit with 824 MiB used, 200 MiB of it page cache the kernel can reclaim: 400 MiB
    # are left, however much RAM the host has free.
    limit, usage, stats = (tmp_path / name for name in ("limit", "usage", "stat"))
    limit.write_text(f"{1 << 30}\n")
    usage.write_text(f"{824 << 20}\n")
    key = "inactive_file" if version == "v2" else "total_inactive_file"
    stats.write_text(f"anon {624 << 20}\n{key} {200 << 20}\n")
    files = (str(limit), str(usage), str(stats), key)
    missing = (str(tmp_path / "none"),) * 3 + ("inactive_file",)
    cgroups = (files, missing) if version == "v2" else (missing, files)
    monkeypatch.setattr(budget_module, "_CGROUP_FILES", cgroups)
    assert resolve_budget("auto", torch.device("cpu")) == (400 << 20) // 2
    limit.write_text("max\n" if version == "v2" else f"{(1 << 63) - 4096}\n")  # no limit
    available = resolve_budget("auto", torch.device("cpu"))
    assert available > (400 << 20) // 2  # this machine's free RAM again


def test_needs_count_state_grads_and_the_head_borrowing_the_embedding() -> None:
    shape = GPTShape(vocab_size=64, context=16, n_layers=2, n_heads=2, d_model=32, mlp_ratio=4,
                     dropout=0.0, bias=True, layernorm_eps=1e-5, init_std=0.02)
    model = GPT(shape)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = build_plan(model)
    call = ((torch.zeros(4, 16, dtype=torch.long),), {})
    needs, boundaries = measure_needs(plan, call, 2, 2)
    block = sum(p.numel() for p in model.blocks[0].parameters()) * 4
    embed = (64 + 16) * 32 * 4
    tied = 2 * 64 * 32 * 4  # the head's gradient of the token embedding, per micro-batch
    assert [n.name for n in needs] == ["embed", "block0", "block1", "head"]
    # The tied gradient is held from the head's backward down to the embedding's.
    assert needs[1].state == 3 * block and needs[1].grads == block + tied
    assert needs[-1].state == 3 * (embed + 2 * 32 * 4)  # ln_f plus the owner's embeddings
    assert needs[-1].grads == 2 * 32 * 4 + tied
    assert needs[0].grads == embed + tied
    assert all(n.activations > 0 for n in needs)
    # Ids go in (8 bytes each), then a (4, 16, 32) fp32 activation per chunk boundary.
    assert boundaries == 2 * (4 * 16 * 8 + 3 * 4 * 16 * 32 * 4)
    for n, p in model.named_parameters():  # measured on the meta device: weights untouched
        assert torch.equal(p, before[n])


def test_a_budget_below_the_largest_chunk_names_it_and_the_minimum() -> None:
    needs = [ChunkNeeds("small", 10, 5, 5), ChunkNeeds("big", 100, 40, 60)]
    assert check_budget(1000, needs, 50) == 1000 - 50 - 100
    with pytest.raises(ConfigError) as err:
        check_budget(249, needs, 50)
    assert "chunk 'big' needs 200 bytes" in str(err.value)
    assert "minimum budget is 250 bytes" in str(err.value)
