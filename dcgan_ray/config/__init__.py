"""Typed job configuration: a job is one YAML file (see `jobs/`) loaded into `JobConfig`.

`sections` holds the dataclasses, each field with its unit, the source of its default and its rule;
`loading` reads a file and `--set` overrides into them and checks every value.
"""

from dcgan_ray.config.loading import (
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    read_job_file,
    set_dotted,
)
from dcgan_ray.config.sections import (
    INCEPTION_URL,
    METRICS,
    SPLIT_NAMES,
    CheckpointSection,
    ClassifierSection,
    DataSection,
    EvalSection,
    JobConfig,
    ModelSection,
    SampleSection,
    ScalingSection,
    SpeedSection,
    StorageSection,
    TrainSection,
    TuneSection,
    rule,
)

__all__ = [
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "parse_override",
    "read_job_file",
    "set_dotted",
    "INCEPTION_URL",
    "METRICS",
    "SPLIT_NAMES",
    "CheckpointSection",
    "ClassifierSection",
    "DataSection",
    "EvalSection",
    "JobConfig",
    "ModelSection",
    "SampleSection",
    "ScalingSection",
    "SpeedSection",
    "StorageSection",
    "TrainSection",
    "TuneSection",
    "rule",
]
