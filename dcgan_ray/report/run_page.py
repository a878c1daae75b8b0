"""A run's page: `runs/<name>/report/index.html`, refreshed after every epoch by rank 0 (off the training
path, `dcgan_ray.train.watch`), and written locally by `dcgan-ray report NAME`.

  report/index.html   status, epochs, best checkpoint, timings per epoch, the learning curves, the sample
                      grids by epoch, the animation, the resolved config
  report/curves.png   losses, D's outputs, the quality metric and throughput per epoch

The grids and the animation are not copied: the page links them where they lie in the run folder
(`../samples/...`), so it opens from the bucket and from a download of the run folder alike
(`dcgan-ray report NAME` downloads the page with the samples, not the checkpoints). The pictures are
drawn as the study report's are (`dcgan_ray.study.plots`), in its page style. Nothing here imports Ray
or torch. Everything shown comes from run.json, which is untrusted input: only numbers are plotted,
every text is escaped, only sample files of the run's own folder are linked or downloaded.
"""

from __future__ import annotations

import html
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from matplotlib.ticker import MaxNLocator

from dcgan_ray.errors import DcganError, ObjectMissing
from dcgan_ray.report.style import PAGE_CSS, new_figure
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.lease_status import ownership
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store

log = logging.getLogger(__name__)

SAMPLE_FILE = re.compile(r"samples/(epoch_\d{4}\.png|latest\.png|progress\.gif)")
"""The sample files a page links: the run's own grids and animation, nothing else from run.json."""

GRIDS_SHOWN = 48
"""At most this many grids on the page (spread evenly, the last always among them): a long run's page
stays light; TensorBoard's images tab has every one."""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Epochs and values of `key`, numbers only (a non-finite value breaks the line where it is)."""
    points = [(entry["epoch"], value) for entry in history if (value := _number(entry.get(key))) is not None]
    return [e for e, _ in points], [v if math.isfinite(v) else math.nan for _, v in points]


def plot_run_curves(history: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Four panels per epoch: both losses, D(x) and D(G(z)), the quality metric, images per second."""
    fig = new_figure(13, 8)
    (ax_loss, ax_d), (ax_metric, ax_speed) = fig.subplots(2, 2)
    panels = [
        (ax_loss, "losses per epoch (mean over its steps)", "loss", [("loss_d", "loss_d"), ("loss_g", "loss_g")]),
        (ax_d, "discriminator outputs per epoch", "probability", [("d_real", "D(x)"), ("d_fake", "D(G(z))")]),
        (ax_metric, f"{metric} per epoch (lower is better; 0 = before training)", metric, [(metric, metric)]),
        (ax_speed, "training throughput, all workers", "images / s", [("images_per_s", "images/s")]),
    ]
    for ax, title, ylabel, keys in panels:
        drawn = False
        for key, label in keys:
            epochs, values = _series(history, key)
            if epochs:
                ax.plot(epochs, values, marker="o", markersize=3, label=label)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not reported (yet)", transform=ax.transAxes, ha="center", color="dimgrey")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_d.set_ylim(-0.02, 1.02)
    fig.savefig(path, dpi=90)


def sample_paths(manifest: dict[str, Any], run_uri: str) -> dict[int, str]:
    """Epoch -> the grid's path in the run folder (samples/epoch_NNNN.png), for the run's own grids only."""
    found = {}
    for uri in manifest.get("samples", {}).get("epochs", []):
        relative = uri[len(run_uri) + 1 :] if isinstance(uri, str) and uri.startswith(f"{run_uri}/") else ""
        if SAMPLE_FILE.fullmatch(relative) and relative.startswith("samples/epoch_"):
            found[int(relative[len("samples/epoch_") : -len(".png")])] = relative
    return found


def animation_path(manifest: dict[str, Any], run_uri: str) -> str | None:
    uri = manifest.get("samples", {}).get("gif")
    relative = uri[len(run_uri) + 1 :] if isinstance(uri, str) and uri.startswith(f"{run_uri}/") else ""
    return relative if relative == "samples/progress.gif" else None


def shown_epochs(epochs: list[int]) -> list[int]:
    if len(epochs) <= GRIDS_SHOWN:
        return epochs
    picks = {epochs[round(i * (len(epochs) - 1) / (GRIDS_SHOWN - 1))] for i in range(GRIDS_SHOWN)}
    return sorted(picks)


def _fmt(value: Any, digits: int = 3) -> str:
    number = _number(value)
    if number is None:
        return "" if value is None else html.escape(str(value))
    return str(int(number)) if number.is_integer() and abs(number) < 1e9 else f"{number:.{digits}f}"


TIMING_COLUMNS = [
    ("epoch", "epoch"),
    ("step", "step"),
    ("epoch_seconds", "seconds"),
    ("images_per_s", "images/s"),
    ("world_size", "workers"),
    ("loss_d", "loss_d"),
    ("loss_g", "loss_g"),
    ("d_real", "D(x)"),
    ("d_fake", "D(G(z))"),
]


def _epochs_table(history: list[dict[str, Any]], metric: str) -> str:
    columns = TIMING_COLUMNS + [(metric, metric), ("classifier_accuracy", "classifier accuracy")]
    rows = ["<table>", "<tr>" + "".join(f"<th>{html.escape(label)}</th>" for _, label in columns) + "</tr>"]
    for entry in history:
        rows.append("<tr>" + "".join(f'<td class="num">{_fmt(entry.get(key))}</td>' for key, _ in columns) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _status_lines(manifest: dict[str, Any], metric: str) -> list[str]:
    history = manifest.get("history", [])
    seconds = sum(s for h in history if (s := _number(h.get("epoch_seconds"))) is not None)
    lines = [
        f"<b>{html.escape(str(manifest.get('status', '?')))}</b>, {_fmt(manifest.get('epochs_completed', 0))} of "
        f"{_fmt(manifest.get('epochs_total', '?'))} epochs; last update {_fmt(manifest.get('updated', '?'))}",
        f"training time {seconds / 60:.1f} min over {sum(1 for h in history if h.get('epoch', 0) > 0)} epochs "
        f"(sum of epoch times, evaluation included)",
    ]
    if manifest.get("world_size"):
        lines.append(f"{_fmt(manifest['world_size'])} worker(s), global batch {_fmt(manifest.get('global_batch'))}")
    best = manifest.get("checkpoints", {}).get("best")
    if isinstance(best, dict):
        lines.append(
            f"best {html.escape(str(best.get('metric', metric)))} {_fmt(best.get('value'))} at epoch "
            f"{_fmt(best.get('epoch'))}: <code>{html.escape(str(best.get('uri')))}</code>"
        )
    if manifest.get("checkpoints", {}).get("latest"):
        lines.append(f"latest checkpoint: <code>{html.escape(str(manifest['checkpoints']['latest']))}</code>")
    resumed = manifest.get("resumed_from")
    if isinstance(resumed, dict):
        lines.append(
            f"resumed at epoch {_fmt(resumed.get('epoch'))} from "
            f"<code>{html.escape(str(resumed.get('checkpoint')))}</code>"
        )
    for resize in manifest.get("resizes", []) if isinstance(manifest.get("resizes"), list) else []:
        if isinstance(resize, dict):
            lines.append(
                f"from epoch {_fmt(resize.get('epoch'))}: {_fmt(resize.get('from'))} -> "
                f"{_fmt(resize.get('to'))} workers"
            )
    if manifest.get("submission_id"):
        lines.append(f"submission <code>{html.escape(str(manifest['submission_id']))}</code>")
    return lines


def render(manifest: dict[str, Any], run_uri: str, curves_name: str, tensorboard_logdir: str) -> str:
    """index.html of the run."""
    raw_config = manifest.get("config")
    config: dict[str, Any] = raw_config if isinstance(raw_config, dict) else {}
    metric = (
        str(config.get("eval", {}).get("metric", "digit_fd")) if isinstance(config.get("eval"), dict) else "digit_fd"
    )
    history = [h for h in manifest.get("history", []) if isinstance(h, dict)]
    name = html.escape(str(manifest.get("name", run_uri.rsplit("/", 1)[-1])))
    metric_of = {h["epoch"]: h.get(metric) for h in history}
    grids = sample_paths(manifest, run_uri)
    figures = "\n".join(
        f'<figure class="grid"><img src="../{html.escape(grids[e])}" alt="samples after epoch {e}" width="256">'
        f"<figcaption>epoch {e}"
        + (f" &middot; {html.escape(metric)} {_fmt(metric_of[e], 1)}" if _number(metric_of.get(e)) is not None else "")
        + "</figcaption></figure>"
        for e in shown_epochs(sorted(grids))
    )
    gif = animation_path(manifest, run_uri)
    animation = (
        f'<figure><img src="../{gif}" alt="the samples epoch by epoch" width="256"><figcaption>every '
        "epoch's grid, animated</figcaption></figure>"
        if gif
        else "<p>The animation is written when training finishes.</p>"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Run {name}</title>
<style>{PAGE_CSS}
.grids {{ display: flex; flex-wrap: wrap; gap: 0.6em; }} figure.grid {{ margin: 0; }}
pre {{ background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }}</style></head>
<body>
<h1>Training run: {name}</h1>
<p class="sub"><code>{html.escape(run_uri)}</code>; this page is refreshed after every epoch.</p>
<ul>{"".join(f"<li>{line}</li>" for line in _status_lines(manifest, metric))}</ul>
<p class="note">Every logged step, every epoch's numbers and every grid, for this run and the others beside it:
<code>tensorboard --logdir {html.escape(tensorboard_logdir)}</code> (docs/watching.md).</p>
<h2>Learning curves</h2>
<figure><img src="{html.escape(curves_name)}" alt="losses, D outputs, {html.escape(metric)} and throughput per epoch">
<figcaption>Per epoch: both losses, D's mean output on real and generated images, {html.escape(metric)}
(lower is better) and images per second.</figcaption></figure>
<h2>Samples</h2>
{animation}
<p>G on the same fixed noise after each epoch (epoch 0: untrained).</p>
<div class="grids">{figures or "<p>No grid yet.</p>"}</div>
<h2>Epochs and timings</h2>
{_epochs_table(history, metric)}
<h2>Config</h2>
<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>
</body></html>
"""


def write_run_page(manifest: dict[str, Any], run_uri: str, out_dir: Path, tensorboard_logdir: str) -> list[Path]:
    """Write report/index.html and curves.png into `out_dir` (created); returns them, index.html last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw_config = manifest.get("config")
    config: dict[str, Any] = raw_config if isinstance(raw_config, dict) else {}
    metric = str((config.get("eval") or {}).get("metric", "digit_fd"))
    curves = out_dir / "curves.png"
    plot_run_curves([h for h in manifest.get("history", []) if isinstance(h, dict)], metric, curves)
    index = out_dir / "index.html"
    index.write_text(render(manifest, run_uri, curves.name, tensorboard_logdir))
    return [curves, index]


def publish_run_page(store: Store, layout: RunLayout, manifest: dict[str, Any], tensorboard_logdir: str) -> str:
    """Write the page into the run folder in the bucket; returns index.html's URI."""
    with tempfile.TemporaryDirectory(prefix="dcgan-run-page-") as tmp:
        for path in write_run_page(manifest, layout.uri, Path(tmp), tensorboard_logdir):
            kind = "text/html; charset=utf-8" if path.suffix == ".html" else "image/png"
            store.put_bytes(f"{layout.report_prefix}/{path.name}", path.read_bytes(), kind)
    return store.uri(layout.report_key)


def download_run_page(store: Store, layout: RunLayout, out_dir: Path, tensorboard_logdir: str) -> Path:
    """The page of the run as run.json says now, with its grids and animation, under `out_dir`
    (out_dir/report/index.html, out_dir/samples/...); returns index.html's path."""
    manifest = read_run_manifest(store, layout)
    if manifest is None:
        raise DcganError(
            f"no run at {layout.uri} (no run.json): check the name, and the bucket and prefix "
            "(--config, or --runs s3://BUCKET/PREFIX/runs); `dcgan-ray runs` lists the runs there"
        )
    manifest["status"] = ownership(store, layout.prefix).status_of(manifest)  # (the lease log's word wins)
    wanted = list(sample_paths(manifest, layout.uri).values())
    if (gif := animation_path(manifest, layout.uri)) is not None:
        wanted.append(gif)
    for relative in wanted:
        target = out_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.write_bytes(store.get_bytes(f"{layout.prefix}/{relative}"))
        except ObjectMissing:
            log.warning(
                "%s/%s is named in run.json but is not in the bucket: left out of the page", layout.uri, relative
            )
    return write_run_page(manifest, layout.uri, out_dir / "report", tensorboard_logdir)[-1]
