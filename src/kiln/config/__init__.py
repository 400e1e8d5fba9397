"""The configuration schema: every field that can change a result, with its documented default.

A config is YAML validated against ``Config``. Unknown keys, wrong types and out-of-range values
are ``ConfigError`` naming the key path, the bad value and what is expected. ``--set a.b=value``
overrides are applied to the raw mapping before validation, so they are checked the same way.

The modules: ``fields`` (value types and the ``Section`` base), ``sections`` (the engine's
sections), ``job_sections`` (hashtron, lattice, nca), ``schema`` (``Config`` and the checks
across sections) and ``loading`` (from a name or file and overrides to a resolved ``Config``).
"""

from kiln.config.job_sections import LatticeSection, NcaSection
from kiln.config.loading import (
    apply_overrides,
    load_config,
    packaged_config_names,
    path_settings,
    resolve_config,
    validate_config,
)
from kiln.config.schema import JOB_SECTIONS, Config
from kiln.config.sections import (
    OptimizerSection,
    PrecisionSection,
    ScheduleSection,
    SourceSection,
    TokenizerSection,
)

__all__ = [
    "JOB_SECTIONS",
    "Config",
    "LatticeSection",
    "NcaSection",
    "OptimizerSection",
    "PrecisionSection",
    "ScheduleSection",
    "SourceSection",
    "TokenizerSection",
    "apply_overrides",
    "load_config",
    "packaged_config_names",
    "path_settings",
    "resolve_config",
    "validate_config",
]
