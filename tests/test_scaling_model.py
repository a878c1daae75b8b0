"""The scaling model (`dcgan_ray.gan.scaling`): the network's arithmetic, the prediction's shape, and the
line the driver logs at start, with its warning when a wide job would waste most of its hardware."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from dcgan_ray.config import config_from_dict
from dcgan_ray.errors import ConfigError
from dcgan_ray.gan.models import build_models, count_parameters
from dcgan_ray.gan.scaling import (
    D_PARAMS,
    G_PARAMS,
    LINKS,
    STEP_ESTIMATES,
    allreduce_seconds,
    ddp_buckets,
    describe_job,
    predict,
    predict_job,
)

A10G_NODE = {"CPU": 4.0, "GPU": 1.0, "memory": 1e10, "accelerator_type:A10G": 1.0}  # g5.xlarge
A10G_X4_NODE = {"CPU": 48.0, "GPU": 4.0, "accelerator_type:A10G": 1.0}  # g5.12xlarge
H100_NODE = {"CPU": 8.0, "GPU": 1.0, "accelerator_type:H100": 1.0}


def job(**scaling):
    return config_from_dict({"scaling": {"use_gpu": True, **scaling}})


def test_gradient_counts_are_the_seed_networks():
    netG, netD = build_models(100, 128, 64, 0.2)
    assert (count_parameters(netG), count_parameters(netD)) == (G_PARAMS, D_PARAMS)


def test_ring_allreduce_over_10_gbit_matches_the_notes():
    # NOTES.md: 23.9 MB in fp32, over 10 Gb/s at N = 2 about 19 ms (2(N-1)/N of the bytes per worker).
    grads = 4 * (G_PARAMS + D_PARAMS)
    assert grads == pytest.approx(23.9e6, rel=2e-3)
    no_latency = LINKS["ethernet_10g"].__class__("x", 1.25, 0.0, "")
    assert allreduce_seconds(grads, 2, no_latency) == pytest.approx(0.0191, rel=0.01)
    assert allreduce_seconds(grads, 4, no_latency) == pytest.approx(0.0191 * 1.5, rel=0.01)  # 2(N-1)/N: 1 -> 1.5
    assert allreduce_seconds(grads, 1, no_latency) == 0.0


def test_one_worker_is_perfectly_efficient():
    p = predict(1, 0.008, LINKS["ethernet_10g"])
    assert p.allreduce_s == 0.0 and p.efficiency == 1.0 and p.images_per_s == pytest.approx(128 / 0.008)


def test_compression_halves_the_bytes_and_the_bandwidth_term():
    plain = predict(2, 0.008, LINKS["ethernet_10g"])
    for compression in ("bf16", "fp16"):
        half = predict(2, 0.008, LINKS["ethernet_10g"], compression=compression)
        assert half.gradient_bytes * 2 == plain.gradient_bytes
        assert half.allreduce_s < 0.51 * plain.allreduce_s + 1e-3  # only the latency part stays
        assert half.efficiency > plain.efficiency


def test_the_levers_move_efficiency_the_right_way():
    step = STEP_ESTIMATES["A10G"]
    two_nodes = predict(2, step.seconds(128), LINKS["ethernet_10g"])
    assert two_nodes.efficiency < 0.5 < two_nodes.efficiency * 2  # slower than one GPU: 2 x 30% = 0.6x
    assert predict(4, step.seconds(128), LINKS["ethernet_10g"]).efficiency < two_nodes.efficiency
    assert predict(2, step.seconds(512), LINKS["ethernet_10g"], batch_per_worker=512).efficiency > two_nodes.efficiency
    ranking = [
        predict(2, step.seconds(128), LINKS[name]).efficiency
        for name in ("ethernet_10g", "ethernet_25g", "pcie", "ethernet_100g", "efa", "nvlink")
    ]
    assert ranking == sorted(ranking)
    # A faster GPU leaves the same all-reduce less compute to amortise it over.
    assert (
        predict(2, STEP_ESTIMATES["H100"].seconds(128), LINKS["pcie"]).efficiency
        < predict(2, step.seconds(128), LINKS["pcie"]).efficiency
    )


def test_small_buckets_cost_latency():
    assert ddp_buckets(4 * D_PARAMS, 25) == 2  # the 1 MiB first bucket, then the rest
    assert ddp_buckets(4 * G_PARAMS, 25) == 2
    assert ddp_buckets(4 * G_PARAMS, 1) == 19
    small = predict(2, 0.008, LINKS["ethernet_10g"], bucket_mb=0.25)
    assert small.allreduce_s > predict(2, 0.008, LINKS["ethernet_10g"]).allreduce_s


def test_auto_link_follows_where_the_workers_can_land():
    assert predict_job(job(num_workers=2), [A10G_NODE] * 4).link.name == "ethernet_10g"
    assert predict_job(job(num_workers=4), [A10G_X4_NODE]).link.name == "pcie"
    assert predict_job(job(num_workers=4, one_node=True), [A10G_NODE]).link.name == "pcie"
    assert predict_job(job(num_workers=2, link="nvlink"), [A10G_NODE] * 2).link.name == "nvlink"
    cpu = config_from_dict({"scaling": {"num_workers": 2}})
    assert predict_job(cpu, [{"CPU": 2.0}]).link.name == "loopback"


def test_step_time_from_the_gpu_type_or_the_config():
    assert predict_job(job(num_workers=2), [H100_NODE] * 2).prediction.step_s == STEP_ESTIMATES["H100"].seconds(128)
    # The slowest GPU present sets every rank's pace.
    mixed = predict_job(job(num_workers=2), [H100_NODE, A10G_NODE])
    assert mixed.prediction.step_s == STEP_ESTIMATES["A10G"].seconds(128)
    unknown = predict_job(job(num_workers=2), [{"CPU": 8.0, "GPU": 1.0, "accelerator_type:T4": 1.0}] * 2)
    assert "T4 has no estimate" in unknown.step.source
    measured = predict_job(job(num_workers=2, step_ms=3.0), [A10G_NODE] * 2)
    assert measured.prediction.step_s == pytest.approx(0.003) and measured.step.source == "scaling.step_ms"


def test_wide_job_over_ethernet_warns_with_what_to_change():
    line, warning = describe_job(job(num_workers=2), [A10G_NODE] * 4)
    assert line.startswith("predicted: 2 GPU workers, ") and "scaling efficiency 30%" in line
    assert "over ethernet_10g" in line
    assert warning is not None and "\n" not in warning
    assert warning.startswith(
        "predicted scaling efficiency 30% is below 50%: 2 workers would train 0.59x as fast as one"
    )
    for change in (
        "scaling.one_node: true",
        "speed.grad_compression: bf16",
        "train.batch_size to 512",
        "dcgan-ray tune",
    ):
        assert change in warning, change


def test_wide_job_on_one_node_does_not_warn():
    line, warning = describe_job(job(num_workers=4), [A10G_X4_NODE])
    assert warning is None and "scaling efficiency 68%" in line and "over pcie" in line
    line, warning = describe_job(job(num_workers=1), [A10G_NODE])
    assert warning is None and "no gradient all-reduce" in line


def test_compression_already_on_is_not_advised_again():
    _, warning = describe_job(
        config_from_dict({"scaling": {"use_gpu": True, "num_workers": 4}, "speed": {"grad_compression": "bf16"}}),
        [A10G_NODE] * 4,
    )
    assert warning is not None and "grad_compression" not in warning


def test_the_driver_logs_the_line_and_the_warning(monkeypatch, caplog):
    from dcgan_ray.train import driver

    nodes = [{"Alive": True, "Resources": A10G_NODE}] * 2 + [{"Alive": False, "Resources": A10G_X4_NODE}]
    monkeypatch.setattr(driver.ray, "nodes", lambda: nodes)
    with caplog.at_level(logging.INFO, logger=driver.__name__):
        driver.log_predicted_scaling(job(num_workers=2))
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == driver.__name__]
    assert [level for level, _ in records] == ["INFO", "WARNING"]
    assert "over ethernet_10g" in records[0][1]  # the dead 4-GPU node is not counted
    assert records[1][1].startswith("predicted scaling efficiency 30% is below 50%")


def test_placement_follows_one_node():
    from dcgan_ray.train.driver import make_trainer
    from dcgan_ray.train.placement import placement_strategy

    assert placement_strategy(job().scaling) == "PACK"
    assert placement_strategy(job(one_node=True).scaling) == "STRICT_PACK"
    # Ray Train asks for what the driver's placement check asked for (no cluster needed to build it).
    assert make_trainer(job(one_node=True, num_workers=2)).scaling_config.placement_strategy == "STRICT_PACK"
    assert make_trainer(job(num_workers=2)).scaling_config.placement_strategy == "PACK"


@pytest.mark.parametrize(
    "scaling, error",
    [
        (
            {"link": "infiniband"},
            r"`scaling\.link` = 'infiniband' is not allowed; expected one of auto, nvlink, pcie, efa",
        ),
        ({"step_ms": 0}, r"`scaling\.step_ms` = 0\.0 is not allowed; expected null or a number > 0"),
        ({"one_node": "yes"}, r"`scaling\.one_node` must be bool"),
    ],
)
def test_bad_scaling_values_name_the_key(scaling, error):
    with pytest.raises(ConfigError, match=error):
        config_from_dict({"scaling": scaling})


def test_the_model_and_the_ddp_options_import_no_ray():
    # benchmarks/scaling.py and gpu.sh run them on GPU machines that have no Ray and no boto3.
    code = (
        "import sys, dcgan_ray.gan.scaling, dcgan_ray.gan.ddp; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'boto3')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
