import re
from pathlib import Path

import pytest

from dcgan_ray.cli import main as cli_main
from dcgan_ray.config import JobConfig, config_from_dict, load_config, parse_override
from dcgan_ray.errors import ConfigError

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_shipped_jobs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)


def test_seed_hyperparameters_in_svhn_job():
    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / "svhn.yaml")
    assert (
        cfg.model.z_dim,
        cfg.train.lr,
        cfg.train.beta1,
        cfg.train.batch_size,
        cfg.train.epochs,
        cfg.model.alpha,
    ) == (100, 2e-4, 0.5, 128, 25, 0.2)
    # The keys docs and tests rely on exist under these names.
    for key in (
        "name",
        "train.epochs",
        "train.batch_size",
        "train.lr",
        "train.beta1",
        "model.z_dim",
        "model.alpha",
        "scaling.num_workers",
        "scaling.use_gpu",
        "storage.endpoint",
        "storage.bucket",
        "storage.prefix",
    ):
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_overrides_win_over_file(tmp_path):
    p = write(tmp_path, "train:\n  epochs: 5\n")
    cfg = load_config(p, ["train.epochs=2", "train.lr=1e-3", "storage.endpoint=null"])
    assert cfg.train.epochs == 2 and cfg.train.lr == 1e-3 and cfg.storage.endpoint is None
    assert load_config(p).train.epochs == 5


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  epoch: 5\n")
    with pytest.raises(ConfigError, match=r"job\.yaml.*unknown key `train\.epoch`.*allowed here:.*epochs"):
        load_config(p)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key `trian`"):
        load_config(write(tmp_path, "trian: {}\n"))


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"`train\.batch_size` must be int, got 'big'"):
        load_config(write(tmp_path, "train:\n  batch_size: big\n"))
    with pytest.raises(ConfigError, match=r"`scaling\.use_gpu` must be bool"):
        load_config(write(tmp_path, "scaling:\n  use_gpu: 3\n"))


def test_out_of_range(tmp_path):
    with pytest.raises(ConfigError, match=r"`train\.beta1` = 1\.5 is not allowed; expected a number in \[0, 1\)"):
        load_config(write(tmp_path, "train:\n  beta1: 1.5\n"))
    with pytest.raises(ConfigError, match=r"`data\.split` = 'valid'.*one of train, test, extra"):
        load_config(write(tmp_path, "data:\n  split: valid\n"))


def test_yaml_style_exponent_accepted(tmp_path):
    # YAML 1.1 reads 2e-4 as a string; a person means the number.
    assert load_config(write(tmp_path, "train:\n  lr: 2e-4\n")).train.lr == 2e-4


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_override("train.epochs")


def test_override_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key `train\.epochz`"):
        load_config(write(tmp_path, "{}\n"), ["train.epochz=3"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/job.yaml")


def test_lr_split():
    cfg = JobConfig()
    cfg.train.lr_d = 1e-5
    assert cfg.train.lr_generator == 2e-4 and cfg.train.lr_discriminator == 1e-5


def test_scoring_in_a_task_needs_eval_epochs_to_be_checkpoint_epochs(tmp_path):
    # Eval every 3 epochs, checkpoints every 2: epoch 3 would have no checkpoint for the task to score.
    p = write(tmp_path, "eval:\n  in_task: true\n  every_epochs: 3\ncheckpoint:\n  every_epochs: 2\n")
    with pytest.raises(
        ConfigError,
        match=r"job.yaml: `eval.in_task` scores checkpoints.*`eval.every_epochs` = 3 "
        r"is not a multiple of `checkpoint.every_epochs` = 2",
    ):
        load_config(p)
    # The same on the command line; a multiple, evaluation off, or the inline path are all fine.
    with pytest.raises(ConfigError, match="eval.in_task"):
        load_config(write(tmp_path, "eval:\n  in_task: true\n"), ["checkpoint.every_epochs=2"])
    assert load_config(p, ["eval.every_epochs=4"]).eval.in_task
    assert load_config(p, ["eval.every_epochs=0"]).eval.every_epochs == 0
    assert not load_config(p, ["eval.in_task=false"]).eval.in_task
    with pytest.raises(ConfigError, match=r"`eval.task_gpus` = -1.0 is not allowed; expected null or a number >= 0"):
        load_config(p, ["eval.every_epochs=4", "eval.task_gpus=-1"])


def test_a_job_extends_another_and_keeps_only_what_differs(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "svhn.yaml").write_text(
        "name: base\ntrain: {epochs: 25, lr: 0.0002}\nstorage: {bucket: base-bucket, prefix: p}\n"
        "tune: {space: {train.lr: {grid: [0.0001]}}}\n"
    )
    site = write(
        tmp_path,
        "extends: base/svhn.yaml\nstorage: {bucket: site-bucket, endpoint: null}\n"
        "tune: {space: {model.alpha: {grid: [0.1]}}}\n",
    )
    cfg = load_config(site, ["train.epochs=3"])
    # Mappings merge key by key; a value replaces the base's; --set wins over both.
    assert (cfg.name, cfg.train.epochs, cfg.train.lr) == ("base", 3, 2e-4)
    assert (cfg.storage.bucket, cfg.storage.prefix, cfg.storage.endpoint) == ("site-bucket", "p", None)
    assert set(cfg.tune.space) == {"train.lr", "model.alpha"}


@pytest.mark.parametrize(
    "text, error",
    [
        ("extends: missing.yaml\n", r"job file .*missing\.yaml does not exist \(extended by .*job\.yaml\)"),
        ("extends: job.yaml\n", r"job\.yaml: `extends: job\.yaml` makes a loop"),
        ("extends: [a.yaml]\n", r"job\.yaml: `extends` must be the path of another job YAML, got \['a\.yaml'\]"),
        ("extends: list.yaml\n", r"list\.yaml \(extended by .*job\.yaml\): the top level must be a mapping"),
    ],
)
def test_a_bad_extends_names_the_files(tmp_path, text, error):
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=error):
        load_config(write(tmp_path, text))


def test_the_kubernetes_job_overlay_is_svhn_on_your_bucket(tmp_path):
    import yaml

    repo = Path(__file__).resolve().parents[1]
    docs = list(yaml.safe_load_all((repo / "cluster" / "k8s-config.yaml").read_text()))
    (config_map,) = [d for d in docs if d and d["kind"] == "ConfigMap"]
    overlay = yaml.safe_load(config_map["data"]["job.yaml"])
    # The image puts the checkout at /home/ray/dcgan-ray; here it is this checkout.
    assert overlay["extends"] == "/home/ray/dcgan-ray/jobs/svhn.yaml"
    overlay["extends"] = str(repo / "jobs" / "svhn.yaml")
    cfg = load_config(write(tmp_path, yaml.safe_dump(overlay)))
    svhn = load_config(repo / "jobs" / "svhn.yaml")
    assert cfg.storage.endpoint is None and cfg.storage.bucket != svhn.storage.bucket
    assert (cfg.model, cfg.train, cfg.scaling) == (svhn.model, svhn.train, svhn.scaling)


@pytest.mark.parametrize(
    "override, key",
    [
        ("name=..", "name"),
        ("name=.", "name"),
        (f"name={'a' * 101}", "name"),
        ("name=a/b", "name"),
        ("name=-rf", "name"),
        ("data.dataset=../../etc", "data.dataset"),
        ("data.dataset=svhn/train", "data.dataset"),
        ("storage.prefix=..", "storage.prefix"),
        ("storage.prefix=a//b", "storage.prefix"),
        ("storage.prefix=a/../b", "storage.prefix"),
        ("storage.runs_prefix=x/.", "storage.runs_prefix"),
        ("tune.study=a/b", "tune.study"),
        ("tune.study=..", "tune.study"),
    ],
)
def test_names_and_prefixes_stay_in_their_folder(override, key):
    with pytest.raises(
        ConfigError,
        match=rf"`{re.escape(key)}` = .* is not allowed; expected (null or )?a (name|key "
        r"prefix)",
    ):
        load_config(Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml", [override])


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("storage.retry_budget_s=.inf", r"a number of seconds in \(0, 86400\]"),
        ("storage.retry_budget_s=20400000", r"a number of seconds in \(0, 86400\]"),
        ("train.seed=99999999999999999999", r"an integer in \[0, 2\*\*31\)"),
        ("train.seed=-1", r"an integer in \[0, 2\*\*31\)"),
        ("model.g_features=100000", r"an integer in \[1, 512\]"),
        ("train.epochs=1000000", r"an integer in \[1, 10000\]"),
    ],
)
def test_numbers_that_would_overflow_or_exhaust_memory_are_refused(override, allowed):
    with pytest.raises(ConfigError, match=rf"is not allowed; expected {allowed}"):
        load_config(Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml", [override])


def test_names_that_are_fine_load():
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml",
        ["name=run_1.v2-b", "storage.prefix=team/a.b/runs-2", "tune.study=lr.sweep"],
    )
    assert (cfg.name, cfg.storage.prefix, cfg.tune.study) == ("run_1.v2-b", "team/a.b/runs-2", "lr.sweep")


@pytest.mark.parametrize("endpoint", ["http://", "https://", "127.0.0.1:8333", "s3://bucket", "ftp://host"])
def test_an_endpoint_must_be_an_http_url_with_a_host(endpoint):
    with pytest.raises(ConfigError, match=r"`storage.endpoint` = .* is not allowed; expected null \(AWS\) or an http"):
        config_from_dict({"storage": {"endpoint": endpoint}}, "job.yaml")
    with pytest.raises(SystemExit):  # argparse's usage error, naming the value
        cli_main(["runs", "--runs", "s3://b/p/runs", "--endpoint", endpoint])
