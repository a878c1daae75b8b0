"""The job's sections as typed dataclasses: every field carries its unit, the source of its default and,
beside it, the rule its value must follow (`field(metadata=rule(...))`). Loading and checking them is
`dcgan_ray.config.loading`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from dcgan_ray.config.rules import (
    AT_LEAST_1,
    NAME,
    NULL_OR_AT_LEAST_1,
    NULL_OR_NAME,
    NULL_OR_POSITIVE,
    NULL_OR_PREFIX,
    POSITIVE,
    PREFIX,
    SPLIT,
    SPLIT_NAMES,
    UNIT_INTERVAL,
    is_http_url,
    rule,
)

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
"""torch-fidelity's conversion of the 2015 TF Inception weights of FID (the file's sha256 is not known
here: these machines cannot download it)."""
METRICS = {"digit_fd": "digit", "fid": "inception"}
"""Quality metric -> the feature extractor it needs. All are distances: lower is better."""


SEED = rule(lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)")
"""Seeds are offset per rank and per epoch before they reach torch's generators: this leaves room."""
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
"""`speed.compile` values: off, or a `torch.compile` mode."""
GRAD_COMPRESSIONS = ("none", "bf16", "fp16")
"""`speed.grad_compression` values: fp32 all-reduce, or one of PyTorch's DDP compression hooks."""
LINKS = ("auto", "nvlink", "pcie", "efa", "ethernet_100g", "ethernet_25g", "ethernet_10g", "loopback")
"""`scaling.link` values: what connects the workers, for the driver's predicted scaling efficiency
(`dcgan_ray.gan.scaling.LINKS` holds each one's bandwidth and where it comes from)."""


@dataclass
class ModelSection:
    z_dim: int = field(default=100, metadata=rule(lambda v: 1 <= v <= 1024, "an integer in [1, 1024]"))
    """Length of the noise vector z. Reference: 100."""
    alpha: float = field(default=0.2, metadata=UNIT_INTERVAL)
    """Leaky-ReLU negative slope in G and D. Reference: 0.2."""
    g_features: int = field(
        default=128, metadata=rule(lambda v: 1 <= v <= 512, "an integer in [1, 512] (G grows with its square)")
    )
    """Channels of G's last hidden layer; the layers above double it (128 -> 256 -> 512). Reference: 512 at 4x4."""
    d_features: int = field(
        default=64, metadata=rule(lambda v: 1 <= v <= 512, "an integer in [1, 512] (D grows with its square)")
    )
    """Channels of D's first conv; the next double it (64 -> 128 -> 256). Reference: 64."""


@dataclass
class TrainSection:
    epochs: int = field(default=25, metadata=rule(lambda v: 1 <= v <= 10_000, "an integer in [1, 10000]"))
    """Passes over the training split. Reference: 25."""
    batch_size: int = field(
        default=128, metadata=rule(lambda v: v >= 2, "an integer >= 2 (BatchNorm needs two images)")
    )
    """Images per worker per step (the reference network's 128 is one device's batch). The global batch is
    batch_size x scaling.num_workers; the job logs both."""
    lr: float = field(default=2e-4, metadata=POSITIVE)
    """Adam learning rate of both networks unless lr_g / lr_d set one apart. Reference: 0.0002."""
    lr_g: float | None = field(default=None, metadata=NULL_OR_POSITIVE)
    """Generator learning rate; null means `lr`. Two-time-scale runs (TTUR) set it apart from lr_d."""
    lr_d: float | None = field(default=None, metadata=NULL_OR_POSITIVE)
    """Discriminator learning rate; null means `lr`."""
    beta1: float = field(default=0.5, metadata=UNIT_INTERVAL)
    """Adam beta1 of both optimizers. Reference: 0.5 (Radford et al. found 0.9 unstable)."""
    beta2: float = field(default=0.999, metadata=UNIT_INTERVAL)
    """Adam beta2. Reference: the framework default 0.999."""
    label_smoothing: float = field(default=0.0, metadata=rule(lambda v: 0.0 <= v < 0.5, "a number in [0, 0.5)"))
    """Real-label target is 1 - label_smoothing in D's loss. Reference: 0 (no smoothing)."""
    seed: int = field(default=0, metadata=SEED)
    """Seeds the weights, the fixed sample noise and each epoch's permutation."""
    log_every_steps: int = field(default=50, metadata=AT_LEAST_1)
    """Steps between progress lines (rank 0)."""

    @property
    def lr_generator(self) -> float:
        return self.lr if self.lr_g is None else self.lr_g

    @property
    def lr_discriminator(self) -> float:
        return self.lr if self.lr_d is None else self.lr_d


@dataclass
class DataSection:
    dataset: str = field(default="svhn", metadata=NAME)
    """Name of the dataset folder in the bucket (`<storage.prefix>/data/<dataset>/<split>/`)."""
    split: str = field(default="train", metadata=SPLIT)
    """Split trained on: train, test or extra."""
    prepare_splits: list[str] = field(
        default_factory=lambda: ["train"],
        metadata=rule(lambda v: bool(v) and all(s in SPLIT_NAMES for s in v), f"a list from {', '.join(SPLIT_NAMES)}"),
    )
    """Splits `dcgan-ray data prepare` puts into the bucket (also: test, extra)."""
    source_url: str = "http://ufldl.stanford.edu/housenumbers/"
    """Where the official SVHN format-2 files are downloaded from (checked against the official md5)."""
    shard_images: int = field(default=16384, metadata=AT_LEAST_1)
    """Images per object in the bucket (16384 x 3 KiB = 48 MiB: large enough for full-speed S3 reads)."""
    max_images: int | None = field(default=None, metadata=NULL_OR_AT_LEAST_1)
    """Train on the first N images only (tests and quick looks); null means the whole split."""


@dataclass
class CheckpointSection:
    every_epochs: int = field(default=1, metadata=AT_LEAST_1)
    """Epochs between checkpoints (and the last epoch always)."""
    keep: int = field(default=3, metadata=AT_LEAST_1)
    """Most recent checkpoints kept in storage."""
    async_upload: bool = True
    """Upload each checkpoint in the background (Ray's CheckpointUploadMode.ASYNC, alpha) while the next
    epoch trains; Ray keeps checkpoints in order, waits for the last one before the run ends, and fails
    the run if an upload fails after the store's outage retries. false: the epoch waits for its upload."""
    preemption_check_s: float = field(default=5.0, metadata=rule(lambda v: v >= 0, "seconds >= 0"))
    """Seconds of training between two asks whether a node of the run is being preempted (a collective,
    timed into steps from each attempt's first steps: benchmarks/preemption_check.py); on a notice the
    run saves a checkpoint at the next ask and loses no step. Notices give 30 s (Kubernetes) to 120 s
    (AWS spot): 5 s leaves the upload most of it. 0: never ask (Ray still restarts from the last one)."""


@dataclass
class SampleSection:
    grid_size: int = field(default=8, metadata=rule(lambda v: 1 <= v <= 32, "an integer in [1, 32]"))
    """The sample grid is grid_size x grid_size tiles of 32 px (8 -> 256x256 PNG)."""
    scale: int = field(default=1, metadata=rule(lambda v: 1 <= v <= 8, "an integer in [1, 8]"))
    """Upscaling factor of the PNG grid (nearest neighbour), for easier viewing."""


@dataclass
class EvalSection:
    every_epochs: int = field(default=1, metadata=rule(lambda v: v >= 0, "an integer >= 0 (0 turns evaluation off)"))
    """Epochs between quality evaluations (also one before training, as epoch 0); 0 turns them off."""
    num_samples: int = field(default=10000, metadata=rule(lambda v: v >= 2, "an integer >= 2"))
    """Generated images per evaluation, split over the workers. 10k is the usual quick FID; use 50k
    to compare with papers (TTUR's DCGAN on SVHN: FID 21.4)."""
    metric: str = field(default="digit_fd", metadata=rule(lambda v: v in METRICS, "digit_fd or fid"))
    """The number that picks the best checkpoint and ranks a study's trials (lower is better): digit_fd or fid."""
    extractors: list[str] = field(
        default_factory=lambda: ["digit"],
        metadata=rule(lambda v: bool(v) and all(e in METRICS.values() for e in v), "a list from digit, inception"),
    )
    """Feature extractors evaluated: digit (our classifier; no outside weights) and/or inception (FID:
    the 2015 Inception v3, ~5.7 GFLOP per image at 299x299 -- meant for GPUs)."""
    inception_weights: str = INCEPTION_URL
    """URI of torch-fidelity's conversion of the TF Inception weights: https, s3:// or a local path.
    Air-gapped clusters copy the file into their bucket and point this at it."""
    inception_sha256: str | None = None
    """Expected sha256 of the weights file; checked when set."""
    batch_size: int = field(default=500, metadata=AT_LEAST_1)
    """Images per generator/extractor forward during evaluation."""
    in_task: bool = False
    """Score each evaluation in a Ray task of its own (Ray Train's ValidationConfig, alpha) instead of
    on every training rank: on eval epochs rank 0 hands Ray the checkpoint and the next epoch trains at
    once, while the task loads that checkpoint's G, scores it and writes its result next to run.json;
    the recorder merges results into run.json's history as they arrive, the task keeps best/, and the
    driver merges the last ones before the run is marked finished. Needs every eval epoch to be a
    checkpoint epoch (eval.every_epochs a multiple of checkpoint.every_epochs); epoch 0 (the untrained
    G) is not scored; studies need false (Tune ranks trials by the metrics each epoch reports). Off by
    default: on the 2-core CPU this was built on, training and the task share the same cores."""
    task_gpus: float | None = field(default=None, metadata=rule(lambda v: v is None or v >= 0, "null or a number >= 0"))
    """GPUs the scoring task asks Ray for (with eval.in_task); null means 1 when scaling.use_gpu, else 0
    (it runs on a CPU). The task needs a GPU that no training worker holds, else it waits until one frees
    (at the latest when training ends), which counts against eval.task_timeout_s."""
    task_timeout_s: float | None = field(default=3600.0, metadata=NULL_OR_POSITIVE)
    """Seconds a scoring task may take, waiting for resources included, before Ray cancels it (its epoch
    then has no quality metrics; the run goes on). null: no limit. 1 h: a 50k-sample FID on one GPU
    takes minutes, and the run's end waits for the last task."""
    min_classifier_accuracy: float = field(default=0.9, metadata=rule(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"))
    """Training and studies that evaluate with the digit classifier refuse to start when its stored test
    accuracy is below this: a classifier near chance (0.1) has features that say nothing about digits,
    and a digit_fd measured in them ranks runs at random. 0.9: what a few hundred steps on SVHN reach
    (docs/quality.md)."""


@dataclass
class ClassifierSection:
    epochs: int = field(default=3, metadata=rule(lambda v: 1 <= v <= 1000, "an integer in [1, 1000]"))
    """Passes over the train split when training the digit classifier."""
    batch_size: int = field(default=128, metadata=rule(lambda v: v >= 2, "an integer >= 2"))
    lr: float = field(default=1e-3, metadata=POSITIVE)
    """Adam learning rate of the classifier."""
    seed: int = field(default=0, metadata=SEED)
    test_split: str = field(default="test", metadata=SPLIT)
    """Split whose accuracy is reported (must be prepared: data.prepare_splits)."""
    max_images: int | None = field(default=None, metadata=NULL_OR_AT_LEAST_1)
    """Train on the first N images only (tests); null means the whole split."""
    min_steps: int = field(default=500, metadata=AT_LEAST_1)
    """Fewest optimizer steps, whatever `epochs` says: a small split gets more epochs. On SVHN-format
    digits 1,024 images x 2 epochs (16 steps) left the classifier at chance and 187 steps reached 0.948;
    500 steps take about a minute on two CPU cores and change nothing for the full split (1,700 steps)."""


@dataclass
class TuneSection:
    """A sensitivity study over this job (`dcgan-ray tune`); training ignores this section."""

    study: str | None = field(default=None, metadata=NULL_OR_NAME)
    """Study name; its trials and report live under <prefix>/studies/<study>/. Null means <name>-study."""
    space: dict[str, Any] = field(default_factory=dict)
    """Config key -> one of {grid: [v, ...]}, {choice: [v, ...]}, {loguniform: [low, high]},
    {uniform: [low, high]}. Grids multiply; the random forms are drawn num_samples times per grid point."""
    seeds: int = field(default=1, metadata=AT_LEAST_1)
    """Each configuration runs with train.seed 0..seeds-1, so the report can tell an effect from seed noise."""
    num_samples: int = field(default=1, metadata=AT_LEAST_1)
    """Draws of the random (choice/uniform/loguniform) parts per grid point."""
    max_concurrent_trials: int | None = field(default=None, metadata=NULL_OR_AT_LEAST_1)
    """Trials at once; null means as many as the cluster's CPUs/GPUs can place (each trial is a
    scaling.num_workers-worker DDP run)."""
    scheduler: str = field(default="none", metadata=rule(lambda v: v in ("none", "asha"), "none or asha"))
    """none, or asha: stop trials whose metric lags the others' at the same epoch."""
    grace_period: int = field(default=1, metadata=AT_LEAST_1)
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: int = field(default=2, metadata=rule(lambda v: v >= 2, "an integer >= 2"))
    """ASHA: the fraction 1/reduction_factor of trials continues at each rung."""
    stop_hopeless: bool = True
    """Stop trials whose losses went non-finite or whose D has won (D(G(z)) ~ 0), and count them."""


@dataclass
class SpeedSection:
    """How the training step runs on the device; the GAN math stays the reference network's. Every switch
    is off by default, so a job trains exactly as the reference's plain fp32 PyTorch loop does until it
    opts in. Measure a choice on your card with `bash benchmarks/gpu.sh` (step table: each switch alone
    and all together, against eager fp32 in the same run), and the all-reduce switches (grad_compression,
    ddp_bucket_mb) with `benchmarks/scaling.py`; what they measured here is in docs/model.md."""

    autocast_bf16: bool = False
    """Run G's and D's forwards under torch.autocast in bfloat16 (convolutions and matmuls in bf16;
    BatchNorm's statistics, the losses and Adam in fp32; no loss scaling, as bf16 has fp32's range).
    Expected on recent NVIDIA GPUs: the largest single gain, as the step's ~1.14 GFLOP per image then
    runs on bf16 tensor cores. Losses differ from fp32 by bf16 round-off. Allowed on CPU, where its speed
    depends on the CPU: it gains on CPUs with native bf16 (AVX512-BF16, AMX) and may lose elsewhere."""
    channels_last: bool = False
    """Keep G's and D's weights and the input batches in torch.channels_last (NHWC) memory format,
    the layout cuDNN's tensor-core convolutions use natively (no transposes around each conv). Same
    results up to float round-off. Expected to help mostly together with autocast_bf16; no gain on CPU."""
    fused_adam: bool = False
    """torch.optim.Adam(fused=True): one fused kernel per optimizer step instead of several per
    parameter tensor, which matters when the step is launch-bound (batch 128 on a GPU). Same update up
    to float round-off. Works on CPU too (torch >= 2.4 has a fused CPU kernel). A resumed run uses this
    run's setting, not the checkpoint's."""
    compile: str = field(
        default="none", metadata=rule(lambda v: v in COMPILE_MODES, "one of " + ", ".join(COMPILE_MODES))
    )
    """torch.compile G and D with this mode (none: eager). default fuses BatchNorm, leaky ReLU and
    tanh into a few generated kernels between the convolutions (cuDNN still runs those); reduce-overhead also replays
    each step's kernels as CUDA graphs, removing the per-kernel launch cost that bounds eager batch-128
    steps (GPU only); max-autotune-no-cudagraphs also benchmarks kernel choices (slow to compile).
    The first steps of a run compile (tens of seconds); evaluation in eval mode compiles once more.
    Works on CPU with a C++ compiler."""
    grad_compression: str = field(
        default="none", metadata=rule(lambda v: v in GRAD_COMPRESSIONS, "one of " + ", ".join(GRAD_COMPRESSIONS))
    )
    """With more than one worker: all-reduce the gradients in bf16 or fp16 (PyTorch's DDP
    `bf16_compress_hook` / `fp16_compress_hook`: each bucket is cast down, summed, cast back) instead of
    fp32. It halves the gradient bytes every step sends, which is what limits scaling between nodes
    (docs/scaling.md). Off by default: the averaged gradients carry bf16/fp16 round-off, so the losses
    differ slightly from fp32's (tests/test_grad_compression.py bounds the difference). Both hooks divide
    by the world size before the cast; bf16 keeps fp32's range, fp16 three more bits of precision.
    benchmarks/scaling.py measures both against fp32."""
    ddp_bucket_mb: float = field(default=25.0, metadata=POSITIVE)
    """MiB of gradients per DDP all-reduce bucket (DDP's `bucket_cap_mb`; 25 is DDP's own default).
    Smaller buckets start all-reducing earlier in the backward but pay a link latency each. The sums are
    the same, so results are too."""


@dataclass
class ScalingSection:
    num_workers: int | list[int] = field(
        default=1,
        metadata=rule(
            lambda v: v >= 1 if isinstance(v, int) else len(v) == 2 and 1 <= v[0] <= v[1],
            "an integer >= 1, or a range [min, max] with 1 <= min <= max",
        ),
    )
    """Ray Train workers, each one DDP rank (one GPU each when use_gpu). A range [min, max] makes the run
    elastic: it starts with as many as the cluster places (at least min), goes on with fewer when a node
    is lost, and grows back towards max when capacity returns. `train.batch_size` stays per worker, so
    the global batch follows the world size; every epoch's world size is in run.json."""
    use_gpu: bool = False
    """Train on GPUs (NCCL) instead of CPUs (gloo)."""
    cpus_per_worker: float = field(default=1.0, metadata=POSITIVE)
    """Logical CPUs Ray reserves per worker."""
    max_failures: int = field(default=2, metadata=rule(lambda v: v >= -1, "an integer >= 0, or -1 for unlimited"))
    """Restarts from the last checkpoint after a worker or node dies (Ray's FailureConfig)."""
    max_preemptions: int = field(default=-1, metadata=rule(lambda v: v >= -1, "an integer >= 0, or -1 for unlimited"))
    """Restarts after a preemption with notice, counted apart from max_failures (Ray's
    max_preemption_failures): such a restart loses no step, so there is no reason to cap it by default."""
    stall_timeout_s: float | None = field(default=None, metadata=NULL_OR_POSITIVE)
    """A rank that makes no progress this long (no step, no evaluation batch, no storage request: a hung
    collective, a wedged read, a stopped process) ends the attempt, and Ray restarts it from the newest
    checkpoint (dcgan_ray.train.stall) up to max_failures times. An outage is not a stall: while any rank
    waits one out within storage.retry_budget_s, no rank is stalled, whatever this is. null: 100 times the
    measured step time, at least 3 minutes and at least storage.retry_budget_s + 1 minute (6 minutes at the
    defaults), so a rank that waits for another retrying storage is not taken for stuck."""
    placement_timeout_s: float = field(default=900.0, metadata=POSITIVE)
    """How long a job waits for the cluster to place its (minimum number of) workers, autoscaler
    included, before it fails with what it waited for. 15 min: cloud GPU nodes take minutes to boot."""
    one_node: bool = False
    """Place every worker on one node (Ray's STRICT_PACK placement; an autoscaler then starts a node type
    with that many GPUs, e.g. the AWS recipe's g5.12xlarge), so the all-reduce stays on the node's
    NVLink or PCIe instead of the network. Off: Ray packs workers where it can but spreads them
    over nodes when it must. Wide jobs across single-GPU nodes scale poorly (docs/scaling.md)."""
    link: str = field(default="auto", metadata=rule(lambda v: v in LINKS, "one of " + ", ".join(LINKS)))
    """What carries the workers' gradient all-reduce, for the efficiency the driver predicts and logs at
    start (it changes nothing in training). auto: with scaling.one_node, or when one node of the cluster
    holds every worker, PCIe (GPU) or loopback (CPU); otherwise 10 Gb/s Ethernet, the AWS recipe's
    g5.xlarge link. Ray cannot see NVLink or EFA: name them here when the nodes have them."""
    step_ms: float | None = field(default=None, metadata=NULL_OR_POSITIVE)
    """One worker's training step at train.batch_size, in ms, for the same prediction; null: an estimate
    for the GPU type Ray reports (docs/scaling.md), or for the CPU. Put the step that
    `bash benchmarks/gpu.sh` measured for your GPU and speed options here."""

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def worker_resources(self) -> dict[str, float]:
        """What Ray reserves for one worker."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {})}


@dataclass
class StorageSection:
    endpoint: str | None = field(
        default="http://127.0.0.1:8333",
        metadata=rule(lambda v: v is None or is_http_url(v), "null (AWS) or an http(s):// URL"),
    )
    """S3 endpoint URL. The default is the local dev stack (cluster/local.sh); null means AWS S3."""
    bucket: str = field(
        default="dcgan-ray",
        metadata=rule(
            lambda v: 3 <= len(v) <= 63 and v == v.lower() and "/" not in v,
            "an S3 bucket name (3-63 lower-case characters, no '/')",
        ),
    )
    """Bucket holding data, runs and reports."""
    prefix: str = field(default="dcgan-ray", metadata=PREFIX)
    """Key prefix of everything this project writes: <prefix>/data/..., <prefix>/runs/<name>/..."""
    region: str = "us-east-1"
    """Region used for request signing (S3-compatible servers accept any)."""
    create_bucket: bool = False
    """Create the bucket if it is missing (the dev stack sets this; real clouds should not)."""
    runs_prefix: str | None = field(default=None, metadata=NULL_OR_PREFIX)
    """Where runs go; null means <prefix>/runs. A sensitivity study puts its trials under its own prefix."""
    retry_budget_s: float = field(
        default=300.0, metadata=rule(lambda v: 0 < v <= 86400, "a number of seconds in (0, 86400]")
    )
    """How long (seconds) a storage outage may last before a read or write gives up. Every read and
    write of the driver and the workers (data, checkpoints, samples, run.json, reports, Ray Train's
    own files) retries with backoff for up to this long, so a restarting S3 server or a short network
    cut does not end a run; past it the job stops with one line and a resubmission resumes. 5 minutes
    covers a server restart with room to spare without idling rented GPUs for long. The first check
    of the endpoint at start does not wait: a wrong endpoint fails in seconds."""
    conditional_writes: bool = True
    """Decide in the bucket which driver writes a run or study (a lease taken with If-None-Match creates,
    dcgan_ray.storage.lease): drivers on any cluster are kept apart. false for an endpoint that ignores
    conditional writes (pre-flight refuses such an endpoint otherwise): then only drivers on one Ray
    cluster are kept apart, and every run says so once."""
    lease_ttl_s: float = field(default=60.0, metadata=rule(lambda v: 10 <= v <= 3600, "seconds in [10, 3600]"))
    """A lease not renewed for this long (seconds) may be taken over; the holder renews every quarter of
    it, and writes only while a write ends before its own deadline (the last renewal, plus this, less a
    margin: dcgan_ray.storage.fence). A lost driver's run waits this long for its next driver: short enough
    for a retry, long enough that a busy driver's pause does not pass for its death. At least 10 s: the
    server's timestamps are whole seconds, and a write needs room before the deadline."""


@dataclass
class JobConfig:
    name: str = field(default="svhn-dcgan", metadata=NAME)
    """Run name: the run lives at <storage.prefix>/runs/<name>/; resubmitting the same name resumes."""
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    sample: SampleSection = field(default_factory=SampleSection)
    eval: EvalSection = field(default_factory=EvalSection)
    classifier: ClassifierSection = field(default_factory=ClassifierSection)
    tune: TuneSection = field(default_factory=TuneSection)
    speed: SpeedSection = field(default_factory=SpeedSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    storage: StorageSection = field(default_factory=StorageSection)

    def is_eval_epoch(self, epoch: int) -> bool:
        """Whether the epoch that completes `epoch` epochs is scored: every eval.every_epochs, and the last."""
        return bool(self.eval.every_epochs) and (epoch % self.eval.every_epochs == 0 or epoch == self.train.epochs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
