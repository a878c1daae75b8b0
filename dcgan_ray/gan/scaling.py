"""What N data-parallel workers gain on the reference network: a model of images/s and scaling efficiency.

No Ray, no torch: the driver calls it before training (`describe_job`), docs/scaling.md tabulates it,
and benchmarks/scaling.py checks it against what it measures.

Per step every worker computes its batch (`step_s`), then waits for two gradient all-reduces that
DDP starts during the backwards: D's (1,033,729 values, in the D phase) and G's (4,935,171, in the G
phase), 23.9 MB in fp32. A ring all-reduce of B bytes over N workers sends and receives 2(N-1)/N x B
per worker, and each of its 2(N-1) rounds waits one link latency, once per DDP bucket. The model adds
the all-reduce to the compute without overlap: DDP overlaps a bucket with the backward still to come,
but 83% of G's parameters (the z projection and the first transposed convolution) sit at G's input end,
so their gradients are ready only when the backward ends, and nothing is left to hide them behind.

  efficiency(N) = images/s of N workers / (N x images/s of one) = step_s / (step_s + allreduce_s)

One worker all-reduces nothing (Ray's `prepare_model` does not wrap a world of one in DDP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dcgan_ray.config import JobConfig

D_PARAMS = 1_033_729
G_PARAMS = 4_935_171
"""The reference network's gradient counts with the default sizes (tests/test_models.py pins them)."""
MIB = 2**20
DDP_FIRST_BUCKET_BYTES = 1 * MIB
"""DDP puts the first gradients of a backward in a 1 MiB bucket, so the first all-reduce starts early
(torch.distributed's `_DEFAULT_FIRST_BUCKET_BYTES`); later buckets hold up to `bucket_cap_mb` MiB."""
BYTES_PER_VALUE = {"none": 4, "bf16": 2, "fp16": 2}
"""Bytes sent per gradient value, by `speed.grad_compression`."""


@dataclass(frozen=True)
class Link:
    """What carries the all-reduce between workers."""

    name: str
    bus_gb_s: float  # all-reduce bus bandwidth, GB/s (1e9 bytes/s): bytes a worker sends per second
    latency_us: float  # per ring round
    source: str  # where the numbers come from


LINKS = {
    link.name: link
    for link in (
        Link(
            "nvlink",
            150.0,
            5.0,
            "NCCL reaches 230-480 GB/s bus bandwidth on A100/H100 NVLink for large "
            "messages; assumed 150 at this network's 1-20 MB buckets",
        ),
        Link(
            "pcie",
            10.0,
            10.0,
            "GPUs of one node without NVLink (g5.12xlarge's 4 A10G): PCIe 4.0 x16 "
            "carries 32 GB/s each way, NCCL's ring through the host bridges far less; assumed 10",
        ),
        Link("efa", 40.0, 20.0, "p4d's 4 x 100 Gb/s EFA (50 GB/s) at about 80% through NCCL's OFI plugin; assumed"),
        Link("ethernet_100g", 12.5, 50.0, "100 Gb/s line rate: an upper bound (TCP gets ~80-90% of it)"),
        Link("ethernet_25g", 3.125, 50.0, "25 Gb/s line rate: an upper bound"),
        Link(
            "ethernet_10g",
            1.25,
            50.0,
            "10 Gb/s line rate: an upper bound, and the AWS recipe's g5.xlarge has "
            "it only as a burst ('up to 10 Gb/s'; the baseline is lower)",
        ),
        Link(
            "loopback",
            1.0,
            50.0,
            "gloo between two 1-thread processes on this project's 2-core machine: "
            "23.9 MB all-reduced in 24-26 ms with the cores free (29-80 ms while other work shared them; "
            "benchmarks/scaling.py)",
        ),
    )
}


@dataclass(frozen=True)
class StepCost:
    """One worker's step time as fixed_s + batch x per_image_s."""

    fixed_s: float  # per step whatever the batch: kernel launches, optimizer steps
    per_image_s: float
    source: str

    def seconds(self, batch: int) -> float:
        return self.fixed_s + batch * self.per_image_s


def _gpu(tflop_s: float, name: str, peak: str) -> StepCost:
    """Eager fp32 (all speed options off; cuDNN's default TF32 convolutions) at 35% of the TF32 tensor
    peak, plus 1.5 ms of launches (~200 kernels a step at ~7 us each)."""
    return StepCost(
        1.5e-3,
        1.14e9 / (0.35 * tflop_s * 1e12),
        f"estimate for {name} (35% of its {peak} TF32 peak + 1.5 ms of launches; not measured)",
    )


STEP_ESTIMATES = {
    "A10G": _gpu(62.5, "A10G", "62.5 TFLOP/s"),
    "A100": _gpu(156.0, "A100", "156 TFLOP/s"),
    "H100": _gpu(495.0, "H100", "495 TFLOP/s"),
    "H200": _gpu(495.0, "H200", "495 TFLOP/s"),
}
"""Per-GPU step estimates, keyed by the type Ray reports (`accelerator_type:<type>` node resources; the
names of `ray.util.accelerators`, not imported here so this module needs no Ray).
Estimates from FLOPs, 1.14 GFLOP per image: no GPU was available to measure them. Replace them with
the step `bash benchmarks/gpu.sh` measures (`scaling.step_ms`)."""
CPU_CORE = StepCost(
    0.0,
    1 / 90,
    "measured on this project's 2-core EPYC: 90 img/s on one free core (1.42 s a "
    "step at batch 128, benchmarks/scaling.py)",
)
UNKNOWN_GPU = "A10G"
"""The estimate used for a GPU type the table lacks: the AWS recipe's, and a slow one, so a warning errs
towards too few workers rather than too many."""


@dataclass(frozen=True)
class Prediction:
    workers: int
    batch_per_worker: int
    step_s: float  # one worker's compute per step
    allreduce_s: float  # the step's gradient all-reduces, not overlapped
    gradient_bytes: int  # bytes all-reduced per step (after compression)

    @property
    def images_per_s(self) -> float:
        return self.workers * self.batch_per_worker / (self.step_s + self.allreduce_s)

    @property
    def efficiency(self) -> float:
        """images/s of these workers / (workers x images/s of one)."""
        return self.step_s / (self.step_s + self.allreduce_s)


def ddp_buckets(num_bytes: int, bucket_mb: float) -> int:
    """All-reduces DDP makes for `num_bytes` of fp32 gradients: the 1 MiB first bucket, then full ones.
    (DDP keeps a parameter in one bucket; at this network's sizes the count differs by one at most.)"""
    rest = max(0, num_bytes - DDP_FIRST_BUCKET_BYTES)
    return 1 + math.ceil(rest / (bucket_mb * MIB))


def allreduce_seconds(num_bytes: float, workers: int, link: Link, buckets: int = 1) -> float:
    """A ring all-reduce of `num_bytes` in `buckets` pieces over `workers`; 0 for one worker."""
    if workers == 1:
        return 0.0
    rounds = 2 * (workers - 1)
    return (workers - 1) / workers * 2 * num_bytes / (link.bus_gb_s * 1e9) + rounds * buckets * link.latency_us * 1e-6


def predict(
    workers: int,
    step_s: float,
    link: Link,
    batch_per_worker: int = 128,
    compression: str = "none",
    bucket_mb: float = 25.0,
    params: tuple[int, ...] = (D_PARAMS, G_PARAMS),
) -> Prediction:
    """Images/s and efficiency of `workers` workers whose step (compute alone) takes `step_s` at
    `batch_per_worker`, all-reducing `params` (one all-reduce per network) over `link`."""
    sent = BYTES_PER_VALUE[compression]
    # Buckets are counted in fp32 bytes: DDP fills them before a compression hook casts them.
    seconds = sum(allreduce_seconds(n * sent, workers, link, ddp_buckets(n * 4, bucket_mb)) for n in params)
    return Prediction(workers, batch_per_worker, step_s, seconds, sum(params) * sent)


# ------------------------------------------------------------------------------------- the driver's line

WARN_BELOW = 0.5
"""Below this efficiency the driver warns: the job then bills more GPU-hours per image than half of it."""


@dataclass(frozen=True)
class JobPrediction:
    prediction: Prediction
    link: Link
    link_reason: str  # "scaling.link" or why auto chose it
    step: StepCost  # one worker's step at any batch


def gpu_types(nodes: list[dict[str, float]]) -> list[str]:
    """GPU types of the nodes with GPUs, from the `accelerator_type:<type>` resource Ray gives them."""
    return sorted(
        {key.split(":", 1)[1] for n in nodes if n.get("GPU", 0) > 0 for key in n if key.startswith("accelerator_type:")}
    )


def choose_link(cfg: JobConfig, nodes: list[dict[str, float]]) -> tuple[Link, str]:
    """scaling.link, or for auto: scaling.one_node, or one node that holds every worker (Ray Train packs
    workers onto as few nodes as it can), means PCIe between GPUs or loopback between CPU processes;
    else the network."""
    s = cfg.scaling
    if s.link != "auto":
        return LINKS[s.link], "scaling.link"
    on_one_node = LINKS["pcie"] if s.use_gpu else LINKS["loopback"]
    if s.one_node:
        return on_one_node, "auto: scaling.one_node"
    need = {k: v * s.max_workers for k, v in s.worker_resources.items()}
    if any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        return on_one_node, "auto: one node holds every worker"
    return LINKS["ethernet_10g"], "auto: the workers span nodes"


def step_cost(cfg: JobConfig, nodes: list[dict[str, float]]) -> StepCost:
    """One worker's step: scaling.step_ms, else the estimate for the job's CPU threads or GPU type."""
    s, batch = cfg.scaling, cfg.train.batch_size
    if s.step_ms is not None:
        # Taken as proportional to the batch: at a larger batch a GPU's fixed launch cost weighs less,
        # so this errs towards a longer step there, and so towards a higher efficiency.
        return StepCost(0.0, s.step_ms / 1e3 / batch, "scaling.step_ms")
    if not s.use_gpu:
        threads = max(1, int(s.cpus_per_worker))
        return StepCost(0.0, CPU_CORE.per_image_s / threads, f"{CPU_CORE.source}; {threads} thread(s) a worker")
    types = gpu_types(nodes)
    # The slowest known type present sets the pace of every rank; an unknown one gets the A10G's.
    known = [t for t in types if t in STEP_ESTIMATES]
    if known:
        return STEP_ESTIMATES[max(known, key=lambda t: STEP_ESTIMATES[t].seconds(batch))]
    cost = STEP_ESTIMATES[UNKNOWN_GPU]
    return StepCost(
        cost.fixed_s,
        cost.per_image_s,
        f"GPU type {'/'.join(types) or 'not reported'} has no estimate, so {cost.source}",
    )


def predict_job(cfg: JobConfig, nodes: list[dict[str, float]]) -> JobPrediction:
    """The prediction for `cfg` on a cluster whose live nodes offer `nodes` (Ray's resource dicts)."""
    link, why = choose_link(cfg, nodes)
    step = step_cost(cfg, nodes)
    p = predict(
        cfg.scaling.max_workers,
        step.seconds(cfg.train.batch_size),
        link,
        cfg.train.batch_size,
        cfg.speed.grad_compression,
        cfg.speed.ddp_bucket_mb,
    )
    return JobPrediction(p, link, why, step)


def describe_job(cfg: JobConfig, nodes: list[dict[str, float]]) -> tuple[str, str | None]:
    """The driver's start-up line, and a one-line warning with what to change when the predicted
    efficiency is below WARN_BELOW (None otherwise)."""
    j = predict_job(cfg, nodes)
    p = j.prediction
    kind = "GPU" if cfg.scaling.use_gpu else "CPU"
    if p.workers == 1:
        return (
            f"predicted: 1 {kind} worker, {p.images_per_s:,.0f} img/s at batch {p.batch_per_worker} "
            f"({j.step.source}); no gradient all-reduce"
        ), None
    line = (
        f"predicted: {p.workers} {kind} workers, {p.images_per_s:,.0f} img/s, scaling efficiency "
        f"{p.efficiency:.0%} (step {p.step_s * 1e3:.1f} ms at batch {p.batch_per_worker}: {j.step.source}; "
        f"all-reduce of {p.gradient_bytes / 1e6:.1f} MB {p.allreduce_s * 1e3:.1f} ms over {j.link.name} at "
        f"{j.link.bus_gb_s:g} GB/s, {j.link_reason}; docs/scaling.md)"
    )
    if p.efficiency >= WARN_BELOW:
        return line, None
    return line, _advice(cfg, j)


def _advice(cfg: JobConfig, j: JobPrediction) -> str:
    """One line: how bad it is and each change with its own predicted efficiency."""
    p, changes = j.prediction, []

    def again(**kw) -> float:
        args = {
            "workers": p.workers,
            "step_s": p.step_s,
            "link": j.link,
            "batch_per_worker": p.batch_per_worker,
            "compression": cfg.speed.grad_compression,
            "bucket_mb": cfg.speed.ddp_bucket_mb,
            **kw,
        }
        return predict(**args).efficiency

    if cfg.scaling.use_gpu and j.link.name.startswith("ethernet"):
        changes.append(
            f"set scaling.one_node: true on a cluster with {p.workers}-GPU nodes "
            f"({again(link=LINKS['pcie']):.0%} over PCIe, more over NVLink)"
        )
    if cfg.speed.grad_compression == "none":
        changes.append(f"set speed.grad_compression: bf16 ({again(compression='bf16'):.0%})")
    bigger = 4 * p.batch_per_worker
    at_bigger = again(batch_per_worker=bigger, step_s=j.step.seconds(bigger))
    changes.append(f"raise train.batch_size to {bigger} ({at_bigger:.0%}; a larger global batch trains differently)")
    changes.append(
        "or run many trials as a study (dcgan-ray tune, 1-worker trials: ~100% each) instead of one wide job"
    )
    speed_vs_one = p.efficiency * p.workers
    return (
        f"predicted scaling efficiency {p.efficiency:.0%} is below {WARN_BELOW:.0%}: {p.workers} workers "
        f"would train {speed_vs_one:.2f}x as fast as one while using {p.workers}x the hardware; " + ", ".join(changes)
    )
