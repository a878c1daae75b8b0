"""Does a second worker pay on the reference network? Step time, the DDP all-reduce per step, DDP's options,
and the scaling model's prediction beside each measurement, in one run.

Spawns --workers processes (default 2) in one process group on 127.0.0.1: gloo on CPU, where each
process gets --threads threads (1: one core per worker, as each GPU worker gets one GPU), NCCL with
--device cuda (one GPU per process). Every row keeps its own G, D and optimizers for the whole run, and
the rows take turns step by step (each step starting at another row), so the drift of a shared machine
reaches every row alike; each row reports the median of its --steps timed steps (after one warm-up step):

  all-reduce   D's and G's gradient-sized tensors (1,033,729 + 4,935,171 values) in fp32, bf16 and
               fp16, alone: the link as DDP uses it (the model's bandwidth comes from the fp32 row)
  1 worker     the project's step (`train_step`) without DDP, rank 0 alone (the others wait outside
               torch): the baseline of every ratio
  independent  every rank runs that step at once, no DDP (at both batches): what sharing the machine
               costs, communication aside (on separate GPUs it is the 1-worker step)
  ddp ...      the step with G and D in DDP as the worker wraps them (`dcgan_ray.gan.ddp`), and with
               each option: bucket_cap_mb 1 and 100, gradient_as_bucket_view, static_graph, the bf16
               and fp16 compression hooks, and a 2x larger batch per worker

efficiency = 1-worker step / N-worker step at the same per-worker batch (= images/s of N / (N x images/s
of one)); "model" is `dcgan_ray.gan.scaling.predict` given the 1-worker step and the measured fp32
all-reduce bandwidth (each worker on a device of its own, as on GPUs), "model, shared" the same with
the independent step as each worker's step (what N workers' compute costs on this machine). With one
GPU only (nothing to all-reduce with) it measures the step at each batch and prints the model's
predictions for 2, 4 and 8 such GPUs over each link instead.

  python benchmarks/scaling.py                          # 2 gloo workers, batch 128, 5 steps per row
  python benchmarks/scaling.py --batch 16 --steps 2     # a quick look
  python benchmarks/scaling.py --device cuda --steps 50         # NCCL on 2 GPUs; one GPU: step times + model
  python benchmarks/scaling.py --predict                        # the model's table for the recipes (docs/scaling.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from queue import Empty

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcgan_ray.config import SpeedSection  # noqa: E402
from dcgan_ray.gan.ddp import compress_gradients, ddp_kwargs  # noqa: E402
from dcgan_ray.gan.models import build_models, count_parameters  # noqa: E402
from dcgan_ray.gan.scaling import CPU_CORE, LINKS, STEP_ESTIMATES, Link, allreduce_seconds, predict  # noqa: E402
from dcgan_ray.gan.step import make_optimizers, train_step  # noqa: E402

Z = 100
REPORT: list[str] = []


def say(line: str = "") -> None:
    """Print a line of the report and keep it for --out-table."""
    print(line, flush=True)
    REPORT.append(line)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    batch_factor: int = 1  # per-worker batch = --batch x this
    ddp: dict | None = None  # None: no DDP (the independent row); else extra DDP kwargs
    compression: str = "none"


VARIANTS = [
    Variant("ddp (defaults)", ddp={}),
    Variant("bucket_cap_mb 1", ddp={"bucket_cap_mb": 1}),
    Variant("bucket_cap_mb 100", ddp={"bucket_cap_mb": 100}),
    Variant("gradient_as_bucket_view", ddp={"gradient_as_bucket_view": True}),
    Variant("static_graph", ddp={"static_graph": True}),
    Variant("bf16 compression hook", ddp={}, compression="bf16"),
    Variant("fp16 compression hook", ddp={}, compression="fp16"),
    Variant("ddp, 2x batch per worker", batch_factor=2, ddp={}),
]
INDEPENDENT = [Variant("independent (no DDP)"), Variant("independent, 2x batch", batch_factor=2)]
"""Every rank steps at once without DDP: each worker's step when N share the machine, communication aside."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Row:
    """One row's G, D, optimizers and batch, kept for the whole run so rows can take turns step by step."""

    def __init__(self, name: str, device: torch.device, batch: int, variant: Variant | None, rank: int):
        self.name, self.batch, self.device, self.variant = name, batch, device, variant
        torch.manual_seed(0)
        netG, netD = (net.to(device) for net in build_models(Z, 128, 64, 0.2))
        if variant is not None and variant.ddp is not None:
            speed = SpeedSection(grad_compression=variant.compression)
            kwargs = {**ddp_kwargs(speed), **variant.ddp}
            ids = [device.index] if device.type == "cuda" else None
            netG, netD = (DistributedDataParallel(net, device_ids=ids, **kwargs) for net in (netG, netD))
            compress_gradients(netG, speed)
            compress_gradients(netD, speed)
        self.nets = netG, netD, *make_optimizers(netG, netD, 2e-4, 2e-4, 0.5, 0.999)
        gen = torch.Generator(device=device).manual_seed(1 + rank)  # each rank its own data, as in training
        self.real = torch.rand(batch, 3, 32, 32, device=device, generator=gen) * 2 - 1
        self.z = torch.randn(batch, Z, device=device, generator=gen)
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []  # this process's CPU time (all its threads) per step
        self.error: str | None = None
        self.losses = (float("nan"), float("nan"))

    def step(self, timed: bool = True) -> None:
        if self.error is not None:
            return
        sync(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            stats = train_step(*self.nets, self.real, self.z)
            sync(self.device)
        except Exception as e:  # a row, not the benchmark: it records its error and sits out
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            return
        if timed:
            self.seconds.append(time.perf_counter() - start)
            self.cpu_seconds.append(time.process_time() - cpu_start)
            self.losses = (stats.loss_d.item(), stats.loss_g.item())  # (a CPU-GPU sync point, after timing)


def timed_allreduce(tensors: list[torch.Tensor], device: torch.device) -> float:
    """Seconds for one step's two all-reduces (D's, then G's), alone."""
    dist.barrier()
    sync(device)
    start = time.perf_counter()
    for t in tensors:
        dist.all_reduce(t)  # (a CPU-GPU sync point on CPU; NCCL queues it on the stream)
    sync(device)
    return time.perf_counter() - start


def rank_main(rank: int, args: argparse.Namespace, port: int, barrier, queue) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Loopback only: the rendezvous, gloo's pairs and NCCL's bootstrap all on lo / 127.0.0.1.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=args.workers)
    try:
        sizes = [count_parameters(net) for net in reversed(build_models(Z, 128, 64, 0.2))]  # D's, then G's
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        grads = {name: [torch.ones(n, dtype=dtype, device=device) for n in sizes] for name, dtype in dtypes.items()}
        allreduce = {name: [] for name in dtypes}
        batches = sorted({args.batch * v.batch_factor for v in VARIANTS})
        # The baseline, rank 0 alone (the other ranks wait on a multiprocessing barrier, idle), per batch.
        solo = {b: Row("1 worker", device, b, None, rank) for b in batches} if rank == 0 else {}
        shared = [Row(v.name, device, args.batch * v.batch_factor, v, rank) for v in [*INDEPENDENT, *VARIANTS]]
        for step in range(1 + args.steps):  # step 0 warms up: DDP builds its buckets, NCCL its communicators
            timed = step > 0
            for name in dtypes:
                seconds = timed_allreduce(grads[name], device)
                if timed:
                    allreduce[name].append(seconds)
            for batch in batches:
                if rank == 0:
                    solo[batch].step(timed)
                barrier.wait()
                turn = [r for r in shared if r.batch == batch]
                # Each step starts the turn at another row, so no row always follows the same one.
                for row in turn[step % len(turn) :] + turn[: step % len(turn)]:
                    dist.barrier()  # every rank starts the row together
                    row.step(timed)
            if rank == 0 and timed:
                print(f"  step {step}/{args.steps} done", flush=True)
        # A step lasts as long as its slowest rank's: take each step's maximum over ranks.
        for row in shared:
            failed = torch.tensor([float(row.error is not None)], device=device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if failed.item():
                row.error = row.error or "failed on another rank"
                continue
            t = torch.tensor(row.seconds, dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            row.seconds = t.tolist()
        for name, values in allreduce.items():
            t = torch.tensor(values, dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            allreduce[name] = t.tolist()
        if rank == 0:
            queue.put(
                {
                    "allreduce": allreduce,
                    "rows": [
                        {
                            "row": r.name,
                            "batch": r.batch,
                            "seconds": r.seconds,
                            "cpu_seconds": r.cpu_seconds,
                            "error": r.error,
                            "losses": r.losses,
                        }
                        for r in [*solo.values(), *shared]
                    ],
                }
            )
    finally:
        dist.destroy_process_group()


def report(measured: dict, args: argparse.Namespace) -> dict:
    """Print the table, the model beside each row, and return it as data."""
    n = args.workers
    rows = {(r["row"], r["batch"]): r for r in measured["rows"]}
    for r in rows.values():
        r["median_s"] = statistics.median(r["seconds"]) if r["seconds"] and not r["error"] else None
    allreduce = {name: statistics.median(v) for name, v in measured["allreduce"].items()}
    gradient_bytes = 4 * sum(count_parameters(net) for net in build_models(Z, 128, 64, 0.2))
    # The bus bandwidth the fp32 row implies; the latency is the model's loopback/NVLink one (negligible here).
    bus = allreduce_seconds(gradient_bytes, n, Link("x", 1.0, 0.0, "")) / allreduce["float32"]
    base_link = LINKS["nvlink" if args.device == "cuda" else "loopback"]
    measured_link = Link("measured", bus, base_link.latency_us, "the fp32 all-reduce row")
    say()
    say(
        f"all-reduce of one step's gradients ({gradient_bytes / 1e6:.1f} MB in fp32) over {n} workers, alone (medians):"
    )
    for name, s in allreduce.items():
        say(f"  {name:9s} {s * 1e3:8.1f} ms   ({allreduce['float32'] / s:4.2f}x as fast as fp32)")
    say(f"  => bus bandwidth {bus:.2f} GB/s (the model's link below)")

    base = rows[("1 worker", args.batch)]["median_s"]
    say(
        f"\nmedians of {args.steps} interleaved steps; efficiency = 1-worker step / {n}-worker step at the same "
        "per-worker batch."
    )
    say(
        f"model: from the 1-worker step (each worker with a device of its own, as on GPUs); model, shared: from "
        f"the independent step (each worker's step while {n} share this machine)"
    )
    say(
        f"{'':26s} batch  ms/step: 1 worker  {n} workers  img/s ({n})  vs 1 worker  efficiency   model  "
        "model, shared  shared/measured"
    )
    table = []
    for v in [*INDEPENDENT, *VARIANTS]:
        batch = args.batch * v.batch_factor
        one, r = rows[("1 worker", batch)]["median_s"], rows[(v.name, batch)]
        ind = rows[(INDEPENDENT[0 if v.batch_factor == 1 else 1].name, batch)]["median_s"]
        row = {"variant": v.name, "batch": batch, "one_worker_s": one, "losses": r["losses"]}
        if r["median_s"] is None:
            row["error"] = r["error"]
            say(f"{v.name:26s} {batch:5d}  failed: {row['error']}")
            table.append(row)
            continue
        s = r["median_s"]
        row.update(
            step_s=s,
            seconds=r["seconds"],
            images_per_s=n * batch / s,
            vs_one_worker=(n * batch / s) / (args.batch / base),
            efficiency=one / s,
        )
        model = ""
        if v.ddp is not None:
            bucket = (v.ddp or {}).get("bucket_cap_mb", 25.0)
            p = predict(n, one, measured_link, batch, v.compression, bucket)
            row["model_efficiency"] = p.efficiency
            model = f"{p.efficiency:6.1%}"
            if ind is not None:
                # The same all-reduce after the step each worker takes while N share the machine.
                shared = one / (ind + predict(n, ind, measured_link, batch, v.compression, bucket).allreduce_s)
                row["model_shared_efficiency"], row["independent_s"] = shared, ind
                model += f"   {shared:12.1%}   {shared / row['efficiency']:14.2f}"
        say(
            f"{v.name:26s} {batch:5d}  {one * 1e3:16.1f} {s * 1e3:9.1f}  {row['images_per_s']:10.1f}  "
            f"{row['vs_one_worker']:10.2f}x  {row['efficiency']:9.1%}   {model}"
        )
        table.append(row)
    ind = rows[(INDEPENDENT[0].name, args.batch)]["median_s"]
    if args.device == "cpu" and ind is not None:
        solo = rows[("1 worker", args.batch)]
        share = statistics.median(c / w for c, w in zip(solo["cpu_seconds"], solo["seconds"], strict=True))
        say(
            f"\nthe 1-worker step had {share:.0%} of a core ({args.threads} thread(s)) "
            + ("" if share > 0.9 * args.threads else "(other processes held the rest) ")
            + f"and each of {n} independent workers' steps took {ind / base:.2f}x as long as it alone: "
            + (
                "sharing this machine, not communication, sets the 2-worker wall time"
                if ind > 1.25 * base
                else "the machine has a core per worker"
            )
        )
    ddps = [rows[(v.name, args.batch)]["median_s"] for v in VARIANTS if v.batch_factor == 1 and v.compression == "none"]
    ddps = [t for t in ddps if t is not None]
    if ind is not None and ddps:
        # Communication alone: the fp32 DDP rows (options that move the same bytes) against the independent step.
        ddp = statistics.median(ddps)
        p = predict(n, ind, measured_link, args.batch)
        say(
            f"communication alone: the fp32 DDP rows' median step {ddp * 1e3:.1f} ms against the independent "
            f"{ind * 1e3:.1f} ms is {ind / ddp:.1%} efficiency; the model's all-reduce "
            f"({p.allreduce_s * 1e3:.1f} ms) gives {p.efficiency:.1%} "
            f"(model/measured {p.efficiency / (ind / ddp):.2f})"
        )
    return {
        "workers": n,
        "batch": args.batch,
        "steps": args.steps,
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "allreduce_s": allreduce,
        "bus_gb_s": bus,
        "rows": table,
    }


def one_gpu(args: argparse.Namespace) -> dict:
    """One GPU: its step at each batch, and the model's predictions for several such GPUs per link."""
    device = torch.device("cuda:0")
    name = torch.cuda.get_device_name(device)
    say(f"one GPU ({name}): no all-reduce to measure; the step on it and the model's predictions")
    steps = {}
    for batch in (args.batch, 4 * args.batch):
        row = Row("1 worker", device, batch, None, 0)
        for step in range(1 + args.steps):
            row.step(timed=step > 0)
        if row.error:
            raise SystemExit(f"the step failed on {name}: {row.error}")
        steps[batch] = statistics.median(row.seconds)
        say(f"  batch {batch:5d}: {steps[batch] * 1e3:7.2f} ms/step  {batch / steps[batch]:9.0f} img/s")
    say(f"\n{'link':14s} {'GB/s':>6s}  " + "  ".join(f"N={n} b={b:<5d}" for b in steps for n in (2, 4, 8)))
    preds = []
    for link in LINKS.values():
        cells = []
        for batch, step_s in steps.items():
            for n in (2, 4, 8):
                p = predict(n, step_s, link, batch)
                cells.append(f"{p.efficiency:11.0%}")
                preds.append(
                    {
                        "link": link.name,
                        "workers": n,
                        "batch": batch,
                        "efficiency": p.efficiency,
                        "images_per_s": p.images_per_s,
                    }
                )
        say(f"{link.name:14s} {link.bus_gb_s:6.2f}  " + "  ".join(cells))
    return {"device": name, "torch": torch.__version__, "step_s": steps, "predictions": preds}


RECIPE_SETUPS = [
    # (setup, step cost, workers, link, per-worker batch, compression)
    ("g5.xlarge: 1 worker (a study's trial)", "A10G", 1, "ethernet_10g", 128, "none"),
    ("2 x g5.xlarge", "A10G", 2, "ethernet_10g", 128, "none"),
    ("2 x g5.xlarge", "A10G", 2, "ethernet_10g", 128, "bf16"),
    ("2 x g5.xlarge", "A10G", 2, "ethernet_10g", 512, "none"),
    ("4 x g5.xlarge", "A10G", 4, "ethernet_10g", 128, "none"),
    ("4 x g5.xlarge", "A10G", 4, "ethernet_10g", 512, "bf16"),
    ("g5.12xlarge (or KubeRay's 2-GPU pod): 2 workers", "A10G", 2, "pcie", 128, "none"),
    ("g5.12xlarge: 4 workers", "A10G", 4, "pcie", 128, "none"),
    ("g5.12xlarge: 4 workers", "A10G", 4, "pcie", 128, "bf16"),
    ("g5.12xlarge: 4 workers", "A10G", 4, "pcie", 512, "none"),
    ("p4d.24xlarge: 8 x A100", "A100", 8, "nvlink", 128, "none"),
    ("2 nodes of 1 A100 over EFA", "A100", 2, "efa", 128, "none"),
    ("p5.48xlarge: 8 x H100", "H100", 8, "nvlink", 128, "none"),
    ("2 x H100 nodes over 100 Gb/s Ethernet", "H100", 2, "ethernet_100g", 128, "none"),
    ("2 CPU workers on one machine (laptop, gloo)", "CPU", 2, "loopback", 128, "none"),
]
"""The setups docs/scaling.md tabulates: the recipes' node types (cluster/aws-cluster.yaml, cluster/kuberay.yaml)
and a few for comparison."""


def predict_table() -> None:
    """docs/scaling.md's table: the model's predictions for RECIPE_SETUPS (no measurement)."""
    say(
        "| setup | link | batch per worker | compression | step (ms) | all-reduce (ms) | img/s | efficiency "
        "| vs one device at batch 128 |"
    )
    say("|---|---|---|---|---|---|---|---|---|")
    for setup, device, n, link, batch, compression in RECIPE_SETUPS:
        cost = CPU_CORE if device == "CPU" else STEP_ESTIMATES[device]
        p = predict(n, cost.seconds(batch), LINKS[link], batch, compression)
        one = 128 / cost.seconds(128)
        say(
            f"| {setup} | {link if n > 1 else '-'} | {batch} | {compression} | {p.step_s * 1e3:.1f} | "
            f"{p.allreduce_s * 1e3:.1f} | {p.images_per_s:,.0f} | {p.efficiency:.0%} | {p.images_per_s / one:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=128, help="per-worker batch (the reference network's 128)")
    parser.add_argument(
        "--steps",
        type=int,
        default=5,
        help="timed steps per row, rows taking turns step by step; each row reports its median",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads per worker")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--out-table", default=None, help="also write the printed report to this file")
    parser.add_argument(
        "--predict",
        action="store_true",
        help="print the model's table for the recipes' node types (docs/scaling.md) and stop",
    )
    args = parser.parse_args()
    if args.predict:
        predict_table()
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    say(
        f"{args.workers} workers, {args.device}"
        + (f" ({args.threads} thread(s) each, gloo on 127.0.0.1)" if args.device == "cpu" else " (NCCL)")
        + f", torch {torch.__version__}, per-worker batch {args.batch}, {args.steps} steps per row"
    )
    if args.device == "cuda" and torch.cuda.device_count() < args.workers:
        result = one_gpu(args) if torch.cuda.device_count() == 1 else None
        if result is None:
            raise SystemExit(f"--workers {args.workers} needs as many GPUs; torch sees {torch.cuda.device_count()}")
    else:
        ctx = mp.get_context("spawn")
        barrier, queue = ctx.Barrier(args.workers), ctx.Queue()
        procs = mp.start_processes(
            rank_main, args=(args, free_port(), barrier, queue), nprocs=args.workers, start_method="spawn", join=False
        )
        while True:
            try:
                measured = queue.get(timeout=5)
                break
            except Empty:
                if procs.join(timeout=0):  # (raises with the rank's traceback when a rank failed)
                    raise SystemExit("the workers ended without handing back their measurements") from None
        while not procs.join():
            pass
        result = report(measured, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if args.out_table:
        Path(args.out_table).write_text("\n".join(REPORT) + "\n")


if __name__ == "__main__":
    main()
