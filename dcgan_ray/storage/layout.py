"""Where everything lives in the bucket: the one module that names keys.

  s3://<bucket>/<prefix>/
    data/<dataset>/<split>/manifest.json             the split's manifest, written last by `data prepare`
    data/<dataset>/<split>/images-<sha>.u8 ...       uint8 NCHW shards, named by content hash
    data/<dataset>/<split>/stats-<extractor>-<weights>-n<count>.npz   reference statistics of the real split
    models/classifier-<dataset>.pt                   the digit classifier behind digit_fd
    runs/<name>/                                     one training run (see RunLayout)
    studies/<study>/study.json                       the study: status, config, submission
    studies/<study>/state.json                       which trials ended (committed to its lease/ log first)
    studies/<study>/lease/                           who runs the study (dcgan_ray.storage.lease)
    studies/<study>/tune/                            Ray Tune's experiment state
    studies/<study>/trials/<trial id>/               each trial's run folder
    studies/<study>/report/                          trials.csv, plots, mosaic, best.yaml, index.html

`dcgan-ray paths CONFIG` prints these URIs for a job, so scripts never spell a key themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcgan_ray.config import JobConfig


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p)


def split_prefix(cfg: JobConfig, split: str | None = None) -> str:
    return _join(cfg.storage.prefix, "data", cfg.data.dataset, split or cfg.data.split)


def split_manifest_key(cfg: JobConfig, split: str | None = None) -> str:
    return f"{split_prefix(cfg, split)}/manifest.json"


def reference_stats_key(cfg: JobConfig, extractor: str, weights_id: str, count: int) -> str:
    return f"{split_prefix(cfg)}/stats-{extractor}-{weights_id}-n{count}.npz"


def classifier_key(cfg: JobConfig) -> str:
    return _join(cfg.storage.prefix, "models", f"classifier-{cfg.data.dataset}.pt")


def scratch_prefix(cfg: JobConfig) -> str:
    """Where pre-flight probes the endpoint (a key created and deleted at once)."""
    return _join(cfg.storage.prefix, "probes")


def runs_prefix(cfg: JobConfig) -> str:
    return cfg.storage.runs_prefix or _join(cfg.storage.prefix, "runs")


def study_name(cfg: JobConfig) -> str:
    return cfg.tune.study or f"{cfg.name}-study"


def study_prefix(cfg: JobConfig) -> str:
    return _join(cfg.storage.prefix, "studies", study_name(cfg))


def study_trials_prefix(cfg: JobConfig) -> str:
    return f"{study_prefix(cfg)}/trials"


def study_report_prefix(cfg: JobConfig) -> str:
    return f"{study_prefix(cfg)}/report"


def study_state_key(cfg: JobConfig) -> str:
    return f"{study_prefix(cfg)}/state.json"


def study_record_key(cfg: JobConfig) -> str:
    return f"{study_prefix(cfg)}/study.json"


STUDY_EXPERIMENT = "tune"
"""Ray Tune's experiment folder under the study prefix (written by Tune, never read back: a study
resumes from its own state.json and each trial's run folder)."""


@dataclass(frozen=True)
class RunLayout:
    """The keys of one run folder:

    run.json                          the manifest: status, config, per-epoch metrics, artifact URIs
    config.yaml                       the resolved job config
    samples/epoch_0001.png ...        G on the fixed noise after each epoch (8x8 grid, 32 px tiles)
    samples/latest.png                the newest of those
    samples/progress.gif              all epochs, animated (written at the end)
    checkpoint_epoch_0001/checkpoint.pt ...   Ray Train's checkpoints, the last `checkpoint.keep`; each
    checkpoint_epoch_0001/manifest.json ...   folder's manifest (sizes, sha256) is written last
    best/checkpoint.pt, best/manifest.json    the checkpoint with the best `eval.metric`, kept apart
    validations/epoch_0001.json ...   with eval.in_task: each scoring task's result (its one writer),
                                      merged into run.json by the recorder and the driver
    checkpoint_manager_snapshot.json  Ray Train's record of the registered checkpoints
    events.out.tfevents.* ...         TensorBoard event files, one per epoch (dcgan_ray.train.events)
    report/index.html, report/curves.png   the run page (dcgan_ray.report.run_page)
    lease/log/00000001.json ...       who writes the run, and its fenced commits (dcgan_ray.storage.lease)
    lease/renewed/00000001.json ...   each holder's renewals
    """

    bucket: str
    prefix: str  # key prefix of the run folder, no trailing '/'

    @classmethod
    def of(cls, cfg: JobConfig) -> RunLayout:
        return cls(cfg.storage.bucket, f"{runs_prefix(cfg)}/{cfg.name}")

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def runs_uri(self) -> str:
        """The folder holding this run and its siblings: TensorBoard's --logdir for them."""
        return f"s3://{self.bucket}/{self.prefix.rsplit('/', 1)[0]}"

    @property
    def manifest_key(self) -> str:
        return f"{self.prefix}/run.json"

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config.yaml"

    def sample_key(self, epoch: int) -> str:
        return f"{self.prefix}/samples/epoch_{epoch:04d}.png"

    @property
    def latest_sample_key(self) -> str:
        return f"{self.prefix}/samples/latest.png"

    @property
    def gif_key(self) -> str:
        return f"{self.prefix}/samples/progress.gif"

    BEST_DIR = "best"

    @property
    def best_dir_key(self) -> str:
        return f"{self.prefix}/{self.BEST_DIR}"

    @property
    def best_key(self) -> str:
        return f"{self.best_dir_key}/checkpoint.pt"

    @property
    def validations_prefix(self) -> str:
        return f"{self.prefix}/validations/"

    def validation_key(self, epoch: int) -> str:
        return f"{self.validations_prefix}epoch_{epoch:04d}.json"

    CHECKPOINT_DIR_PREFIX = "checkpoint_epoch_"

    EVENTS_PREFIX = "events.out.tfevents."
    """How every TensorBoard event file's name starts (TensorBoard finds a run's files by 'tfevents')."""

    def events_key(self, file_name: str) -> str:
        return f"{self.prefix}/{file_name}"

    @property
    def report_prefix(self) -> str:
        return f"{self.prefix}/report"

    @property
    def report_key(self) -> str:
        return f"{self.report_prefix}/index.html"

    def checkpoint_dir_key(self, dir_name: str) -> str:
        return f"{self.prefix}/{dir_name}"


def job_paths(cfg: JobConfig) -> dict[str, str]:
    """Every URI a person or a script asks for, by name (`dcgan-ray paths`)."""
    run = RunLayout.of(cfg)
    uri = lambda key: f"s3://{cfg.storage.bucket}/{key}"  # noqa: E731
    return {
        "data": uri(split_prefix(cfg)),
        "classifier": uri(classifier_key(cfg)),
        "run": run.uri,
        "run_manifest": uri(run.manifest_key),
        "latest_samples": uri(run.latest_sample_key),
        "animation": uri(run.gif_key),
        "best_checkpoint": uri(run.best_key),
        "run_page": uri(run.report_key),
        "tensorboard_logdir": uri(runs_prefix(cfg)),
        "study": uri(study_prefix(cfg)),
        "study_report": uri(f"{study_report_prefix(cfg)}/index.html"),
    }
