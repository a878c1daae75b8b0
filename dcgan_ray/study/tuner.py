"""Running a hyperparameter sensitivity study on Ray Tune: every trial is a multi-worker DDP training run.

`dcgan-ray tune jobs/svhn-tune.yaml` reads the job's `tune:` section (see `config.TuneSection`), expands
its trials (`dcgan_ray.study.trials`) and runs each as the Train V2 pattern prescribes: a function
trainable that fits a `TorchTrainer`, reporting to Tune through `TuneReportCallback`. This module holds
that Ray side: each trial's run (`run_trial`), the stopper of hopeless trials, the callback that
republishes the report as trials end (`StudyReport`), and `run_study`. Trials are ranked by
`eval.metric`, lower is better.

Everything lives under s3://<bucket>/<prefix>/studies/<study>/ (named in `dcgan_ray.storage.layout`):
  state.json       which trials ended, and how (`dcgan_ray.study.state`)
  trials/<name>/   each trial's run folder (run.json, samples, checkpoints), as a training job has
  report/          trials.csv, PNG plots, mosaic.png, best.yaml, index.html (refreshed as trials end)
  tune/            Tune's own experiment state: written by Tune, never read back

Nothing read from the bucket is unpickled: Tune's `Tuner.restore` would unpickle `tune/`, so anyone who
can write there would run code as the driver. Instead a resubmitted study expands the same trials again
and finds each one's folder by its name: trials that `state.json` says ended are reported from their
run.json, the others run (resuming from their own checkpoints).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import ray.exceptions
import ray.train
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from dcgan_ray.config import JobConfig, config_from_dict
from dcgan_ray.errors import ConfigError, LeaseLost, ObjectMissing, StorageUnreachable
from dcgan_ray.logs import setup_logging
from dcgan_ray.ray_internals import has_launching_autoscaler, stop_tune_copying_env_vars
from dcgan_ray.storage.layout import (
    STUDY_EXPERIMENT,
    RunLayout,
    study_name,
    study_prefix,
    study_report_prefix,
)
from dcgan_ray.storage.lease import Lease
from dcgan_ray.storage.runs import epochs_durable, read_run_manifest
from dcgan_ray.storage.s3 import Store
from dcgan_ray.study.outcomes import Thresholds, TrialRecord, is_hopeless, summary_text
from dcgan_ray.study.report import write_report
from dcgan_ray.study.state import ENDED, read_study_state, write_study_record, write_study_state
from dcgan_ray.study.trials import decode_key, expand_trials, trial_job, trial_name
from dcgan_ray.train.driver import (
    connect_ray,
    first_failure,
    fit,
    our_error,
    preflight,
    s3_filesystem,
)
from dcgan_ray.train.ownership import own
from dcgan_ray.train.placement import check_capacity

log = logging.getLogger(__name__)


def run_trial(trial_config: dict[str, Any], base: dict[str, Any]) -> None:
    """Tune's function trainable: fit one trial's TorchTrainer (or report a finished one again)."""
    setup_logging()
    cfg = trial_job(base, trial_config["trial"])
    store, layout = Store(cfg.storage), RunLayout.of(cfg)
    finished = read_run_manifest(store, layout)
    if finished and epochs_durable(finished) >= cfg.train.epochs and finished["history"]:
        # A resubmitted study may hand us a trial that finished after the study last saved its state.
        tune.report(finished["history"][-1])
        return
    try:
        # Each trial's run folder is held like a training job's; a trial a lost study left running ends once
        # that study's driver is gone, and its lease expires: this one waits for it.
        with own(cfg, "run", layout.prefix, layout.uri, wait=True, stop_main_thread=False) as lease:
            fit(cfg, lease, callbacks=[TuneReportCallback()])
    except ray.train.TrainingFailedError as e:
        error = our_error(e)
        if error is None:
            raise
        raise error from None  # the trial's error is the worker's own, and the report shows its one line


class HopelessStopper(tune.Stopper):
    """Stops a trial whose losses went non-finite or whose discriminator has won."""

    def __init__(self, thresholds: Thresholds):
        self.thresholds = thresholds
        self.histories: dict[str, list[dict[str, Any]]] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if result.get("preempted"):  # a preemption's mid-epoch report: no epoch's numbers to judge
            return False
        history = self.histories.setdefault(trial_id, [])
        history.append(result)
        if is_hopeless(history, self.thresholds):
            log.warning("stopping trial %s early: hopeless at epoch %s", trial_id, result.get("epoch"))
            return True
        return False

    def stop_all(self) -> bool:
        return False


class StudyReport(tune.Callback):
    """Republishes the report in S3 as trials end, from a thread of its own.

    Tune calls its callbacks on its event loop, and a report (every manifest, PNG and plot) takes
    seconds: the callback only notes the trials' state and wakes the thread, which rebuilds the report
    from the newest state, so refreshes asked for while one runs coalesce into one. A failed refresh is
    logged and never fails the study.
    """

    def __init__(self, base: dict[str, Any], earlier: Sequence[_TrialView] = (), lease: Lease | None = None):
        self.base, self.lease = base, lease
        self.earlier = list(earlier)  # trials that ended in an earlier run of the study
        self.trials: list[_TrialView] = list(earlier)
        self.refreshes = 0  # reports written (for the log and the tests)
        self._wake = threading.Condition()
        self._pending = False
        self._closed = False
        self._thread: threading.Thread | None = None
        _live_reports[_study_key(base)] = self

    def __reduce__(self):
        # Tune pickles its callbacks into its experiment state (which this project never reads back); a
        # condition and a thread do not pickle, and a copy must never become a second live report.
        return _live_report, (self.base,)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._refresh(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._refresh(trials)

    def _refresh(self, trials: list) -> None:
        views = [
            _TrialView(
                trial_name(t.config["trial"]),
                t.config["trial"],
                t.status,
                _trial_error(t) if t.status == "ERROR" else None,
            )
            for t in trials
        ]
        with self._wake:
            self.trials = self.earlier + views
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="study-report", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                self._pending = False
            self.publish()

    def close(self) -> None:
        """Let the thread write what is pending, then stop it."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def publish(self) -> tuple[str | None, list[TrialRecord]]:
        """Write the report of the ended trials to S3; returns its index.html URI (None when nothing was
        written) and the records. Never raises: a report is not worth failing a study for."""
        records: list[TrialRecord] = []
        try:
            cfg = config_from_dict(self.base, "study")
            write_study_state(
                Store(cfg.storage),
                cfg,
                {t.trial_id: {"state": t.status, "error": t.error} for t in list(self.trials) if t.status in ENDED},
                self.lease,
            )
            records = [r for r in (self.record(t) for t in list(self.trials)) if r is not None]
            if not records:
                return None, records
            store = Store(cfg.storage)
            prefix = study_report_prefix(cfg)
            with tempfile.TemporaryDirectory(prefix="dcgan-report-") as tmp:
                paths = write_report(records, Path(tmp), cfg.eval.metric, self.base, study_name(cfg))
                for path in paths:
                    store.put_bytes(f"{prefix}/{path.name}", path.read_bytes(), _content_type(path))
        except LeaseLost:  # another driver took the study over: this one stops, and its driver says why
            return None, records
        except Exception as e:  # noqa: BLE001 -- any failure, ours or a plotting bug, is logged, not raised
            log.error("the study report could not be written (the study goes on): %s: %s", type(e).__name__, e)
            return None, records
        self.refreshes += 1
        return store.uri(f"{prefix}/index.html"), records

    def record(self, trial: _TrialView) -> TrialRecord | None:
        if trial.status not in ("TERMINATED", "ERROR"):
            return None
        job = trial_job(self.base, trial.config)
        store, layout = Store(job.storage), RunLayout.of(job)
        manifest = read_run_manifest(store, layout) or {"history": []}
        try:
            png = store.get_bytes(layout.latest_sample_key)
        except ObjectMissing:
            png = None
        history = manifest["history"]
        epochs_done = max((h["epoch"] for h in history), default=0)
        return TrialRecord(
            trial_id=trial.trial_id,
            params={decode_key(k): v for k, v in trial.config["params"].items()},
            seed=int(trial.config["seed"]),
            history=history,
            state=trial.status,
            stopped_early=trial.status == "TERMINATED" and epochs_done < job.train.epochs,
            sample_png=png,
            error=trial.error,
        )


_live_reports: dict[str, StudyReport] = {}


def _study_key(base: dict[str, Any]) -> str:
    return f"{base['storage']['endpoint']} {base['storage']['bucket']} {study_prefix(config_from_dict(base))}"


def _live_report(base: dict[str, Any]) -> StudyReport:
    return _live_reports.get(_study_key(base)) or StudyReport(base)


def _trial_error(trial: Any) -> str | None:
    """One line for a live Tune trial's error: our own message, else the failure's first line."""
    try:
        error = trial.get_pickled_error()
    except Exception:  # noqa: BLE001 -- an unreadable error file must not stop the report
        error = None
    return error_line(error) if error is not None else "the trial failed (no error recorded)"


def error_line(error: BaseException) -> str:
    ours = our_error(error)
    if ours is not None:
        return ours.for_job(None)
    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    return first_failure(cause) if isinstance(cause, ray.train.TrainingFailedError) else first_failure(error)


def _content_type(path: Path) -> str:
    return {".png": "image/png", ".html": "text/html", ".csv": "text/csv", ".yaml": "text/yaml"}.get(
        path.suffix, "application/octet-stream"
    )


def max_concurrent(cfg: JobConfig, trials: int) -> int:
    """Trials side by side: each is a placement group of its workers. On an autoscaling cluster every
    trial may ask (the autoscaler adds what it can; the rest wait for a trial to end), elsewhere as many
    as the cluster's resources hold."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    if has_launching_autoscaler():
        return trials
    total, s = ray.cluster_resources(), cfg.scaling
    fits = min(total.get(k, 0) // (v * s.min_workers) for k, v in s.worker_resources.items())
    return max(1, int(fits))


CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def run_study(
    cfg: JobConfig, address: str | None = None, wait_for_lease: bool = False, submitted: dict | None = None
) -> dict[str, Any]:
    """Run (or continue) the study; returns its report's index.html URI and the trial records. The study's
    lease in the bucket is held throughout (`wait_for_lease`: wait for another driver's to end)."""
    if not cfg.tune.space:
        raise ConfigError("`tune.space` is empty; name at least one setting to vary (see jobs/svhn-tune.yaml)")
    if not cfg.eval.every_epochs:
        raise ConfigError("a study ranks trials by `eval.metric`; set eval.every_epochs >= 1")
    if cfg.eval.in_task:
        raise ConfigError(
            "a study ranks trials by the `eval.metric` each epoch reports, which a scoring task "
            "(eval.in_task) adds only later; set eval.in_task: false"
        )
    if cfg.tune.scheduler == "asha" and cfg.eval.every_epochs != 1:
        raise ConfigError("ASHA compares trials every epoch; set eval.every_epochs: 1")
    store = preflight(cfg)
    connect_ray(address)
    check_capacity(cfg.scaling)
    # Every Ray process has the credentials from its node's environment (see dcgan_ray.storage.s3): Tune
    # must not copy the driver's into the trials' runtime envs, which Ray keeps in plain text.
    stop_tune_copying_env_vars(CREDENTIAL_VARIABLES)
    # One driver per study: two `tune` runs of one study would train the same trials into the same folders.
    uri = f"s3://{cfg.storage.bucket}/{study_prefix(cfg)}"
    with own(cfg, "study", study_prefix(cfg), uri, wait_for_lease) as lease:
        status: str | None = "failed"
        write_study_record(store, cfg, status="running", **({"submitted": submitted} if submitted else {}))
        try:
            result = _run_holding(cfg, store, lease)
            status = "finished"
            return result
        except KeyboardInterrupt:  # the renewal thread's, when the lease was lost: say so in one line
            if lease is not None and lease.lost is not None:
                raise lease.lost from None
            raise
        except StorageUnreachable:
            status = None  # (writing study.json would wait out the outage again)
            raise
        finally:
            if status is not None and (lease is None or lease.lost is None):
                write_study_record(store, cfg, status=status)


def _run_holding(cfg: JobConfig, store: Store, lease: Lease | None) -> dict[str, Any]:
    base = cfg.to_dict()
    path = f"{cfg.storage.bucket}/{study_prefix(cfg)}"
    # The trial function only waits on its TorchTrainer, whose workers reserve their own resources;
    # Ray refuses an empty request, so the trial takes a token share of a CPU.
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base), {"CPU": 0.01})
    trials = {trial_name(t): t for t in expand_trials(cfg)}
    ended = read_study_state(store, cfg, lease)
    terminated = {name for name in trials if ended.get(name, {}).get("state") == "TERMINATED"}
    earlier = [_TrialView(name, t, "TERMINATED", None) for name, t in trials.items() if name in terminated]
    pending = [t for name, t in trials.items() if name not in terminated]
    concurrent = max_concurrent(cfg, len(pending))
    log.info("study %s: %d trial(s), %d at a time, under s3://%s", study_name(cfg), len(trials), concurrent, path)
    if earlier:
        log.info(
            "study %s exists: %d trial(s) ended in an earlier run and are not run again; %d to run",
            study_name(cfg),
            len(earlier),
            len(pending),
        )
    report = StudyReport(base, earlier, lease)
    results: list[Any] | tune.ResultGrid = []
    if pending:
        scheduler = None
        if cfg.tune.scheduler == "asha":
            scheduler = tune.schedulers.ASHAScheduler(
                time_attr="epoch",
                max_t=cfg.train.epochs,
                grace_period=cfg.tune.grace_period,
                reduction_factor=cfg.tune.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            # Each trial's values are fixed here (expand_trials), so a resubmission finds the same ones.
            param_space={"trial": tune.grid_search(pending)},
            tune_config=tune.TuneConfig(
                metric=cfg.eval.metric, mode="min", max_concurrent_trials=concurrent, scheduler=scheduler
            ),
            run_config=tune.RunConfig(
                name=STUDY_EXPERIMENT,
                storage_path=path,
                storage_filesystem=s3_filesystem(cfg),
                stop=HopelessStopper(Thresholds()) if cfg.tune.stop_hopeless else None,
                callbacks=[report],
                verbose=1,
            ),
        )
        try:
            results = tuner.fit()
        finally:
            report.close()
    if lease is not None:
        lease.check()  # (Tune stops gracefully when the renewal thread interrupts it: a lost study ends here)
    # ResultGrid iterates through __getitem__ (the old sequence protocol), which mypy does not count.
    report.trials = earlier + [_TrialView.of(result) for result in results]  # type: ignore[union-attr]
    uri, records = report.publish()
    print(summary_text(records, cfg.eval.metric))
    return {"report": uri, "records": records}


class _TrialView:
    """What the report needs of a trial, from a live Tune Trial or a finished Result alike."""

    def __init__(self, trial_id: str, config: dict[str, Any], status: str, error: str | None):
        self.trial_id, self.config, self.status, self.error = trial_id, config, status, error

    @classmethod
    def of(cls, result: Any) -> _TrialView:
        error = error_line(result.error) if result.error else None
        trial = result.config["trial"]
        return cls(trial_name(trial), trial, "ERROR" if result.error else "TERMINATED", error)
