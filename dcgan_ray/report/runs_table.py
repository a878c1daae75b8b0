"""`dcgan-ray runs`: every run under a runs folder, from its run.json and its lease (no Ray needed).

One row per run: status, epochs done of the total, the best checkpoint's metric, when run.json was last
written, the submission that queued it (`dcgan-ray submit` records it), and its lease in the bucket: who
holds it and how long ago it was renewed, or that it expired or was released. Newest update first. A
caller that can tell orphaned runs (`dcgan_ray.recovery`) passes `orphaned`: their status reads
`orphaned`, and a line under the table says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dcgan_ray.errors import StorageError
from dcgan_ray.storage.layout import RunLayout
from dcgan_ray.storage.lease_status import ownership
from dcgan_ray.storage.runs import read_run_manifest
from dcgan_ray.storage.s3 import Store


@dataclass
class RunRow:
    name: str
    status: str
    epochs: str
    best: str
    updated: str
    submission: str
    lease: str = ""
    why: str = ""  # why it is orphaned


def list_runs(
    store: Store, runs_prefix: str, orphaned: Callable[[Store, str, dict[str, Any]], str | None] | None = None
) -> list[RunRow]:
    rows = []
    for name in store.list_folders(f"{runs_prefix.strip('/')}/"):
        layout = RunLayout(store.bucket, f"{runs_prefix.strip('/')}/{name}")
        try:
            m = read_run_manifest(store, layout)
            held = ownership(store, layout.prefix)
        except StorageError as e:  # a damaged or planted run.json or lease entry: say so in its row, list the others
            rows.append(RunRow(name, "unreadable", "", str(e).split(" (", 1)[0][:80], "", ""))
            continue
        if m is None:  # a folder without run.json: not a run (or one whose driver never started)
            continue
        best = m.get("checkpoints", {}).get("best")
        why = (orphaned(store, layout.prefix, m) if orphaned else None) or ""
        rows.append(
            RunRow(
                name,
                "orphaned" if why else held.status_of(m),
                f"{m.get('epochs_completed', 0)}/{m.get('epochs_total', '?')}",
                f"{best['metric']} {best['value']:.2f} @{best['epoch']}" if best else "",
                str(m.get("updated", "")),
                str(m.get("submission_id") or ""),
                held.describe() if held.state != "none" else "",
                why,
            )
        )
    return sorted(rows, key=lambda r: r.updated, reverse=True)


def format_runs(rows: list[RunRow], where: str) -> str:
    if not rows:
        return f"no runs under {where}"
    header = ("NAME", "STATUS", "EPOCHS", "BEST", "UPDATED", "SUBMISSION", "LEASE")
    table = [header] + [(r.name, r.status, r.epochs, r.best, r.updated, r.submission, r.lease) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    orphans = [f"  {r.name}: orphaned: {r.why}" for r in rows if r.why]
    if orphans:
        orphans.append("  submit them again, each resuming from its last checkpoint: dcgan-ray recover --address URL")
    return "\n".join([f"runs under {where}:", *lines, *orphans])
