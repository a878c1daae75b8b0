"""`dcgan-ray runs` and `recover`'s search read the runs in parallel (issue 34): the same rows in the same order
as one at a time, narrowed by --status and --name (the name before any run is read). Real SeaweedFS; no Ray."""

from __future__ import annotations

import json
import re
import threading
import uuid

import pytest

from dcgan_ray.cli import main as cli_main
from dcgan_ray.recovery import find_orphans, orphaned
from dcgan_ray.report.runs_table import SCAN_THREADS, STATUSES, list_runs
from dcgan_ray.storage.lease_log import LeaseLog
from dcgan_ray.storage.s3 import Store
from helpers import BUCKET, make_config

# (run.json's status, what its lease log holds) -> the status `runs` shows
KINDS = {
    ("finished", "finished"): "finished",
    ("failed", "failed"): "failed",
    ("stopped", "released"): "stopped",
    ("queued", "none"): "queued",
    ("scoring", "held"): "scoring",
    ("running", "held"): "running",
    ("running", "released"): "orphaned",
    ("running", "stale"): "finished",  # a stale driver's run.json; the log's later generation finished it
    ("garbage", "none"): "unreadable",
}


def entries(lease: str) -> list[dict]:
    """A lease log as drivers leave it (`dcgan_ray.storage.lease`); a holder on no machine of ours, so only
    its age decides whether it is held."""
    holder = {"host": "elsewhere", "pid": 7, "cluster": "c", "since": "2025-01-01T00:00:00Z", "ttl_s": 3600.0}

    def entry(seq: int, kind: str, generation: int, **body) -> dict:
        return {"seq": seq, "kind": kind, "generation": generation, "writer": f"w{generation}", **body}

    if lease == "none":
        return []
    if lease == "stale":
        ended = [entry(3, "acquire", 3, holder=holder), entry(4, "commit", 3, state="finished")]
        return [entry(1, "acquire", 1, holder=holder), entry(2, "release", 1), *ended, entry(5, "release", 3)]
    taken = [entry(1, "acquire", 1, holder=holder)]
    if lease == "held":
        return taken
    ended = [entry(2, "commit", 1, state=lease)] if lease in ("finished", "failed") else []
    return [*taken, *ended, entry(len(taken) + len(ended) + 1, "release", 1)]


@pytest.fixture(scope="module")
def planted(s3_server) -> tuple[Store, str, dict[str, str]]:
    """60 runs, race-NN and calm-NN, each of KINDS in turn, their updates tied in threes (the order of ties is
    the listing's); a folder with a lease log but no run.json. Returns (store, runs folder, name -> status)."""
    cfg = make_config(s3_server.endpoint, f"t-{uuid.uuid4().hex[:10]}")
    store, runs = Store(cfg.storage), f"{cfg.storage.prefix}/runs"
    store.check()
    expected = {}
    for i in range(60):
        name = f"{'race' if i % 2 else 'calm'}-{i:02d}"
        (status, lease), shown = list(KINDS.items())[i % len(KINDS)]
        manifest = {"name": name, "status": status, "epochs_total": 5, "epochs_completed": i % 6, "generation": 1}
        manifest["updated"] = f"2025-01-01T00:{i // 3:02d}:00Z"
        manifest["submission_id"] = f"raysubmit_{i}"
        body = b"{not json" if status == "garbage" else json.dumps(manifest).encode()
        store.put_bytes(f"{runs}/{name}/run.json", body)
        for e in entries(lease):
            assert LeaseLog(store, f"{runs}/{name}").append(e)
        expected[name] = shown
    assert LeaseLog(store, f"{runs}/race-never-started").append(entries("held")[0])
    return store, runs, expected


def without_ages(row) -> tuple:
    """A row with its lease's and its orphan reason's seconds left out (they tick between two listings)."""
    return (row.name, row.status, row.epochs, row.best, row.updated, row.submission) + tuple(
        re.sub(r"\d+(?= ?s\b)", "N", text) for text in (row.lease, row.why)
    )


def test_the_parallel_listing_is_the_sequential_one(planted):
    store, runs, expected = planted
    threads: dict[str, set[str]] = {"parallel": set(), "sequential": set()}

    def recording(into: set[str]):
        def check(store_: Store, folder: str, record: dict) -> str | None:
            into.add(threading.current_thread().name)
            return orphaned(store_, folder, record)

        return check

    parallel = list_runs(store, runs, recording(threads["parallel"]))
    sequential = list_runs(store, runs, recording(threads["sequential"]), threads=1)
    assert [without_ages(r) for r in parallel] == [without_ages(r) for r in sequential]
    assert {r.name: r.status for r in parallel} == expected
    assert [r.updated for r in parallel] == sorted((r.updated for r in parallel), reverse=True)
    assert threads["sequential"] == {threading.main_thread().name}
    assert 1 < len(threads["parallel"]) <= SCAN_THREADS and threading.main_thread().name not in threads["parallel"]
    held = next(r for r in parallel if r.status == "running")
    assert re.fullmatch(r"held by pid 7 \(\d+s ago\)", held.lease), held.lease


def table_names(argv: list[str], runs: str, store: Store, capsys) -> tuple[str, list[str]]:
    """(first line, the names in the table) of `dcgan-ray runs` over `runs`."""
    capsys.readouterr()
    assert cli_main(["runs", "--runs", store.uri(runs), "--endpoint", store.endpoint, *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    return lines[0], [line.split(" ", 1)[0] for line in lines[2:] if not line.startswith(" ")]


def test_status_and_name_narrow_the_runs_command(planted, capsys, monkeypatch):
    store, runs, expected = planted
    first, names = table_names(["--status", "finished"], runs, store, capsys)
    assert first == f"runs under {store.uri(runs)} (status finished, name *):"
    assert sorted(names) == sorted(n for n, s in expected.items() if s == "finished")
    _, names = table_names(["--status", "orphaned,queued", "--status", "unreadable"], runs, store, capsys)
    assert sorted(names) == sorted(n for n, s in expected.items() if s in ("orphaned", "queued", "unreadable"))

    read: list[str] = []
    get_bytes, list_keys = Store.get_bytes, Store.list_keys
    monkeypatch.setattr(Store, "get_bytes", lambda self, key: read.append(key) or get_bytes(self, key))
    monkeypatch.setattr(
        Store, "list_keys", lambda self, prefix, **kw: read.append(prefix) or list_keys(self, prefix, **kw)
    )
    first, names = table_names(["--name", "race-*"], runs, store, capsys)
    assert first == f"runs under {store.uri(runs)} (status {','.join(STATUSES)}, name race-*):"
    assert sorted(names) == sorted(n for n in expected if n.startswith("race-"))
    assert read and not [key for key in read if "/calm-" in key]  # the name decided before any run was read
    _, names = table_names(["--name", "calm-?4", "--status", "orphaned"], runs, store, capsys)
    assert names == ["calm-24"] and expected["calm-24"] == "orphaned"
    first, names = table_names(["--name", "nobody-*"], runs, store, capsys)
    assert (first, names) == (f"no runs under {store.uri(runs)} (status {','.join(STATUSES)}, name nobody-*)", [])


@pytest.mark.parametrize(
    "given, wrong",
    [(["--status", "done"], "'done'"), (["--status", "finished", "--status", "Failed,runing"], "'Failed', 'runing'")],
)
def test_a_bad_status_is_one_error_line_naming_the_allowed_ones(given, wrong, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["runs", "--runs", f"s3://{BUCKET}/p/runs", *given])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert line == (
        f"dcgan-ray runs: error: argument --status: {wrong} is not a status; give one or more of running, finished, "
        "failed, stopped, queued, scoring, orphaned, unreadable (repeat --status or separate them with commas)"
    )


def test_recover_searches_in_parallel_only_the_runs_named(planted, capsys):
    store, runs, expected = planted
    orphans = find_orphans(store, runs, None, "race-*")
    assert [o.name for o in orphans] == [
        n for n in sorted(expected) if n.startswith("race-") and expected[n] == "orphaned"
    ]
    assert [o.name for o in orphans] == [o.name for o in find_orphans(store, runs, None, "race-*", threads=1)]
    assert {o.name for o in find_orphans(store, runs, None)} == {n for n, s in expected.items() if s == "orphaned"}
    capsys.readouterr()
    assert cli_main(["recover", "--runs", store.uri(runs), "--endpoint", store.endpoint, "--name", "none-*"]) == 0
    assert capsys.readouterr().out == (
        f"nothing to recover: no run under {store.uri(runs)} (nor study beside it) named none-* is orphaned\n"
    )
