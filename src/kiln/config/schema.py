"""``Config``: every section together, and the checks that span sections."""

from __future__ import annotations

import hashlib
from typing import Literal

import yaml
from pydantic import Field, model_validator

from kiln.config.fields import NonNegInt, Section
from kiln.config.job_sections import HashtronSection, LatticeSection, NcaSection
from kiln.config.sections import (
    CheckpointSection,
    DataSection,
    EvalSection,
    HardwareSection,
    LoggingSection,
    ModelSection,
    ObjectivesSection,
    OptimizerSection,
    PrecisionSection,
    RunSection,
    SampleSection,
    ScheduleSection,
    StrategySection,
    TrainingSection,
)

JOB_SECTIONS = ("hashtron", "lattice", "nca")
_LM_ONLY = ("model", "data", "objectives", "sample")
_GRADIENT_ONLY = ("optimizer", "schedule", "training", "precision", "eval")
# What each job never reads: a value set there would change nothing, without a word.
UNREAD_SECTIONS: dict[str, tuple[str, ...]] = {
    "lm": JOB_SECTIONS,
    "lattice": (*_LM_ONLY, "hashtron", "nca"),
    "nca": (*_LM_ONLY, "hashtron", "lattice"),
    "hashtron": (*_LM_ONLY, *_GRADIENT_ONLY, "lattice", "nca"),
}


class Config(Section):
    """The whole truth about a run."""

    seed: NonNegInt = Field(1337, description="Seeds python, numpy and torch RNGs.")
    job: Literal["lm", "hashtron", "lattice", "nca"] = Field(
        "lm", description="What is trained: lm (the GPT code model), hashtron, lattice or nca."
    )
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    objectives: ObjectivesSection = Field(default_factory=ObjectivesSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    precision: PrecisionSection = Field(default_factory=PrecisionSection)
    hardware: HardwareSection = Field(default_factory=HardwareSection)
    strategy: StrategySection = Field(default_factory=StrategySection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    sample: SampleSection = Field(default_factory=SampleSection)
    hashtron: HashtronSection = Field(default_factory=HashtronSection)
    lattice: LatticeSection = Field(default_factory=LatticeSection)
    nca: NcaSection = Field(default_factory=NcaSection)

    @model_validator(mode="after")
    def _strategy_fits_job(self) -> Config:
        name = self.strategy.name
        if name == "single":
            return self
        if self.job == "hashtron":
            raise ValueError(
                f"strategy.name: {name} trains gradient jobs only; the hashtron job runs in one "
                "process (set strategy.name: single)"
            )
        if name == "streaming" and self.optimizer.name not in ("adamw", "sgd"):
            raise ValueError(
                f"strategy.name: streaming keeps each chunk's optimizer state on disk for adamw "
                f"and sgd only, not {self.optimizer.name}; set optimizer.name: adamw or sgd"
            )
        if name == "streaming" and self.hardware.keep_freed_memory:
            raise ValueError(
                "hardware.keep_freed_memory keeps freed memory resident, which defeats "
                "strategy.name: streaming's memory budget; set it to false"
            )
        if self.job in ("lattice", "nca") and name in ("ddp", "fsdp"):
            raise ValueError(
                f"strategy.name: {name} is not available for the {self.job} job: its state pool "
                "lives in one process (set strategy.name: single)"
            )
        if name == "fsdp" and (self.optimizer.l1 or self.optimizer.l2):
            raise ValueError(
                "strategy.name: fsdp does not support optimizer.l1/l2 (the explicit terms are "
                "computed on whole parameters); set them to 0 or use strategy.name: ddp"
            )
        if name == "fsdp" and set(self.eval.suites) - {"ppl"}:
            raise ValueError(
                "strategy.name: fsdp evaluates ppl only during training (every rank must run "
                "the same forwards); set eval.suites: [ppl] and run `kiln eval` on the run"
            )
        return self

    @model_validator(mode="after")
    def _an_objective_has_weight(self) -> Config:
        if self.job != "lm":
            return self
        o = self.objectives
        cot = o.cot
        roles = cot.prompt_weight + cot.reasoning_weight + cot.answer_weight
        if not (
            o.weights.next_token > 0
            or (o.fim_rate > 0 and o.weights.fim > 0)
            or (cot.path is not None and o.weights.cot > 0 and roles > 0)
        ):
            raise ValueError(
                "objectives: every token would have loss weight 0, so nothing would train; "
                "give objectives.weights.next_token a positive weight (or weights.fim with "
                "fim_rate > 0, or weights.cot with cot.path set)"
            )
        return self

    @model_validator(mode="after")
    def _lattice_pool_fits_the_batch(self) -> Config:
        batch = self.training.micro_batch_size * self.training.grad_accum_steps
        if self.job == "lattice" and self.lattice.pool_size < batch:
            raise ValueError(
                f"lattice.pool_size ({self.lattice.pool_size}) must be at least the batch of "
                f"training.micro_batch_size x grad_accum_steps ({batch})"
            )
        return self

    @model_validator(mode="after")
    def _nca_pool_fits_the_batch(self) -> Config:
        batch = self.training.micro_batch_size * self.training.grad_accum_steps
        n = self.nca
        if self.job != "nca":
            return self
        if 0 < n.pool_size < batch:
            raise ValueError(
                f"nca.pool_size ({n.pool_size}) must be 0 or at least the batch of "
                f"training.micro_batch_size x grad_accum_steps ({batch})"
            )
        if n.damage and not n.pool_size:
            raise ValueError("nca.damage needs a pool (nca.pool_size > 0): it damages pool states")
        if n.damage >= batch:
            raise ValueError(
                f"nca.damage ({n.damage}) must be below the batch of "
                f"training.micro_batch_size x grad_accum_steps ({batch}): the worst sample "
                "is reseeded, so it cannot also be damaged"
            )
        return self

    def to_yaml(self) -> str:
        """The resolved config as YAML (the run's snapshot), without other jobs' sections."""
        others = {name for name in JOB_SECTIONS if name != self.job}
        return yaml.safe_dump(self.model_dump(mode="json", exclude=others), sort_keys=False)

    def fingerprint(self) -> str:
        """Short hash of the resolved config."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:12]
