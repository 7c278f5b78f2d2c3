"""Benchmark: the default full run as the data grows, stage by stage.

    .venv/bin/python bench/scale.py [--rows 1000000,3000000,10000000] [--epochs N]
                                    [--plot PATH] [--smoke]

Runs ``python -m pipelines.full_run --dataset synthetic --rows N --workdir <tmp>`` as a user
runs it (early stopping, refit, batch inference: the defaults) once per size, each in a fresh
process with a fresh embedded Ray (its own ``RAY_TMPDIR``, never a Ray already running), and
reads what the run itself records:

  prepare, refit, infer   ``summary.json``'s stage seconds
  baselines               the evaluated model folder's ``metrics.json``: each driver-side
                          baseline's ``seconds`` (EASE, iALS; a skipped one adds nothing),
                          and their share of the training stage (``baselines_share``: over
                          ``summary.json``'s train seconds)
  train, eval             ``history.json`` per epoch: training rows / samples per second, and
                          the evaluation's ``eval_seconds`` (rank 0)
  total                   the process's wall time (interpreter, Ray's start and stop included)

While a run goes, its process tree is sampled every ``--sample-every`` seconds (psutil) for
the peak resident memory of one process per kind: the driver (the run's own process),
training workers (``ray::RayTrainWorker``) and Ray Data workers (``ray::`` tasks and actors
named after Ray Data operators: ReadX, MapBatches, MapWorker, Write, ...); the whole tree's
peak is printed too. Ray's object store (plasma, shared memory the raylet maps) is not
measured separately: its pages count in the processes that touch them. The driver's peak is
also kept per stage (the latest ``[stage]`` line it printed: a stage's own work and whatever
runs before the next stage's first line), with the object-store pages among it (RssShmem).

Prints a table per size (seconds per stage, per epoch, memory, disk, test Recall@20 of the
model beside every baseline in ``metrics.json``), the growth exponent of each stage's time
(the log-log slope between the smallest and the largest size) and the stage that dominates
at the largest, then one JSON line; writes that JSON and a log-log plot of seconds per stage
against rows under ``<--cache>/scale/`` (``--plot`` moves the plot).

``--smoke``: 20,000 and 40,000 rows, ``--epochs 1``, both at once (``--parallel``: one tiny
full run is a minute of fixed costs, mostly waiting), everything in a temporary folder
(removed after): the same code and the same JSON keys, to check that the benchmark runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.smoke import parse_and_run  # noqa: E402

STAGES = ("prepare", "baselines", "train", "eval", "refit", "infer")
KINDS = ("driver", "train_worker", "data_worker")
# --smoke's sizes (flags given explicitly still win)
SMOKE = {"rows": "20000,40000", "epochs": 1, "parallel": True}
# Ray Data names its tasks and actors after the operators they run (ReadRange->MapBatches(f),
# MapWorker(MapBatches(Score)), Write...): the process title then starts with ray::<that>
DATA_TITLE = re.compile(r"^ray::\S*(Read|Map|Write|Split|Shuffle|Aggregate|Sort|Repartition|"
                        r"Filter|Project|Limit|Zip|Union|Datasink|FlatMap)")
GB = 1e9
# after the last epoch the exported epoch ranks every test user once; only printed
EXPORTED_LINE = re.compile(r"^\[train\] epoch \d+ \(exported\): test .*; ([0-9.]+)s$")


@dataclass
class MemoryPeaks:
    """Peak resident memory of one process of each kind, and of the whole tree at once."""

    peak: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        (*KINDS, "other"), 0))
    tree: int = 0
    titles: dict[str, set[str]] = field(default_factory=lambda: {k: set() for k in KINDS})
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create_time
    stage: str = "start"                  # the run's latest ``[stage]`` line
    # the driver's peak per stage: its resident bytes and the shared memory among them
    # (RssShmem: object-store pages it maps, counted in the object store's budget too)
    driver_stages: dict[str, tuple[int, int]] = field(default_factory=dict)

    def kind(self, pid: int, root: int, title: str) -> str:
        if pid == root:
            return "driver"
        if "RayTrainWorker" in title:
            return "train_worker"
        return "data_worker" if DATA_TITLE.match(title) else "other"

    def sample(self, root: psutil.Process) -> None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for p in procs:
            try:
                with p.oneshot():
                    rss, title = p.memory_info().rss, " ".join(p.cmdline())
                    self.seen.setdefault(p.pid, p.create_time())
            except psutil.Error:  # gone between the listing and the read
                continue
            kind = self.kind(p.pid, root.pid, title)
            self.peak[kind] = max(self.peak[kind], rss)
            if kind == "driver":
                was = self.driver_stages.get(self.stage, (0, 0))
                self.driver_stages[self.stage] = (max(was[0], rss),
                                                  max(was[1], shmem_bytes(p.pid)))
            if kind in self.titles:
                self.titles[kind].add(title.split(" ")[0][:60])
            total += rss
        self.tree = max(self.tree, total)


def shmem_bytes(pid: int) -> int:
    """A process's resident shared memory (``RssShmem``: Ray's object store pages it maps),
    from ``/proc/<pid>/status``; 0 where that cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sample_until_done(proc: subprocess.Popen, mem: MemoryPeaks, every: float) -> None:
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        mem.sample(root)
        time.sleep(every)


def echo_stages(stream: Any, lines: list[str], rows: int, mem: "MemoryPeaks") -> None:
    """Keep every line of the run's output; show its stage lines (``[stage] ...``) as they
    come, so a run of many minutes says where it is, and tell ``mem`` the stage."""
    for line in stream:
        lines.append(line.rstrip("\n"))
        if line.startswith("["):
            mem.stage = line[1:line.find("]")] if "]" in line else mem.stage
            print(f"  {rows:>10,} {line.rstrip()}", flush=True)


def stop_leftovers(mem: MemoryPeaks, grace: float = 15.0) -> None:
    """Ray's processes of a run end with its driver; any still alive after ``grace`` seconds
    (the same pid and start time as sampled: this run's, never another's) are ended."""
    deadline = time.monotonic() + grace
    left: list[psutil.Process] = []
    while time.monotonic() < deadline:
        left = []
        for pid, created in mem.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.Error:
                pass
        if not left:
            return
        time.sleep(0.5)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    print(f"    ended {len(left)} process(es) of the run still alive after {grace:.0f}s")


def run_size(rows: int, epochs: Optional[int], tmp: Path, every: float
             ) -> tuple[Path, float, MemoryPeaks, list[str]]:
    """One full run in a fresh process, everything it writes under ``tmp`` (its temp dir,
    Ray's session files, the workdir); returns (the workdir, wall seconds, memory peaks, the
    lines it printed)."""
    tmp.mkdir(parents=True)
    work = tmp / "w"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    env.update(TMPDIR=str(tmp), RAY_TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pipelines.full_run", "--dataset", "synthetic",
           "--rows", str(rows), "--workdir", str(work),
           *(["--epochs", str(epochs)] if epochs else [])]
    print(f"\n== {rows:,} rows: {' '.join(cmd[1:])}", flush=True)
    mem, lines = MemoryPeaks(), []
    with open(tmp / "stderr.txt", "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
                                text=True, bufsize=1)
        reader = threading.Thread(target=echo_stages, args=(proc.stdout, lines, rows, mem),
                                  daemon=True)
        reader.start()
        try:
            sample_until_done(proc, mem, every)
        except BaseException:
            proc.kill()
            raise
        finally:
            proc.wait()
            seconds = time.perf_counter() - t0
            reader.join(timeout=10)
            stop_leftovers(mem)
    if proc.returncode != 0:
        tail = "\n".join(lines[-30:])
        raise SystemExit(f"full_run at {rows:,} rows exited {proc.returncode}\nstdout tail:\n"
                         f"{tail}\nstderr tail:\n{(tmp / 'stderr.txt').read_text()[-4000:]}")
    return work, seconds, mem, lines


def disk_bytes(folder: Path) -> dict[str, int]:
    """Bytes of the files under each top-level entry of ``folder``."""
    out: dict[str, int] = {}
    for entry in folder.iterdir():
        if entry.is_file():
            out[entry.name] = entry.stat().st_size
            continue
        out[entry.name] = sum(f.stat().st_size for f in entry.rglob("*")
                              if f.is_file() and not f.is_symlink())
    return out


def read_run(work: Path) -> dict[str, Any]:
    """What the run recorded: summary, dataset sizes, the evaluated model's metrics and
    per-epoch history, and the workers' world size."""
    from app.core.publish import current
    from app.data.dataset import Manifest
    from app.run import RunSummary
    from app.train.model_folder import HISTORY_JSON, PLAN_FILE, read_metrics

    summary = RunSummary.read(work)
    model = current(work / "model-heldout")
    manifest = Manifest.read(current(work / "data")).to_dict()
    return {"summary": summary, "vocab": manifest["vocab"], "metrics": read_metrics(model),
            "history": json.loads(Path(model, HISTORY_JSON).read_text()),
            "world": json.loads(Path(model, PLAN_FILE).read_text())["world_size"]}


def baselines_of(metrics: dict[str, Any]) -> tuple[dict[str, float], float, list[str]]:
    """Every baseline in ``metrics.json``: (test Recall@20 of each, seconds of the
    driver-side ones, why any is missing)."""
    recall, seconds, missing = {}, 0.0, []
    for name, m in metrics.items():
        if name == "model" or not isinstance(m, dict):
            continue
        if "skipped" in m:
            missing.append(f"{name}: {m['skipped']}")
        elif "recall@20" in m.get("test", {}):
            recall[name] = round(m["test"]["recall@20"], 4)
        else:
            missing.append(f"{name}: no test recall@20 in metrics.json")
        seconds += float(m.get("seconds", 0.0))
    return recall, seconds, missing


def measure(rows: int, epochs: Optional[int], tmp: Path, every: float, keep: bool
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One size, run under ``tmp``: (its JSON entry, extra figures for the table)."""
    work, total, mem, lines = run_size(rows, epochs, tmp, every)
    run = read_run(work)
    stages = run["summary"].stages
    history = run["history"]
    train_s = [h["train_rows"] / (run["world"] * h["train_samples_per_s_per_worker"])
               for h in history]
    eval_s = [h.get("eval_seconds", float("nan")) for h in history]
    recall, base_s, missing = baselines_of(run["metrics"])
    for reason in missing:
        print(f"    baseline missing at {rows:,} rows: {reason}")
    if any(math.isnan(s) for s in eval_s):
        print(f"    eval seconds at {rows:,} rows: not recorded per epoch (history.json has "
              f"no eval_seconds)")
    found = [float(m.group(1)) for m in map(EXPORTED_LINE.match, lines) if m]
    if not found:  # the evaluated run prints it once (a refit has no evaluation)
        raise SystemExit(f"the exported epoch's test line is not in the log at {rows:,} rows: "
                         f"bench/scale.py's EXPORTED_LINE no longer matches the run's output")
    exported = sum(found)
    seconds = {"prepare": stages["prepare"].seconds, "baselines": base_s,
               "train": sum(train_s),
               "eval": sum(s for s in eval_s if not math.isnan(s)) + exported,
               "refit": stages["refit"].seconds if "refit" in stages else 0.0,
               "infer": stages["infer"].seconds, "total": total}
    disk = disk_bytes(work)
    entry = {"rows": rows, "users": run["vocab"]["users"], "items": run["vocab"]["items"],
             "seconds": {k: round(v, 2) for k, v in seconds.items()},
             "epochs": run["metrics"]["epochs"],
             "samples_per_s": round(sum(h["train_rows"] for h in history) / sum(train_s)),
             "peak_rss_gb": {k: round(mem.peak[k] / GB, 3) for k in KINDS},
             "disk_gb": round(sum(disk.values()) / GB, 3),
             # the budget: the baselines against the whole training stage (baselines,
             # epochs, evaluation, export, registration), as the run's summary times it
             "baselines_share": round(base_s / stages["train"].seconds, 3),
             "test_recall@20": {"model": round(run["metrics"]["model"]["test"]["recall@20"],
                                               4), **recall}}
    extra = {"exported": exported, "per_epoch": list(zip(train_s, eval_s)),
             "val": [h.get("val_recall@20") for h in history],
             "best_epoch": run["metrics"]["best_epoch"], "tree_gb": mem.tree / GB,
             "other_gb": mem.peak["other"] / GB, "disk": disk, "titles": mem.titles,
             "driver_stages": dict(mem.driver_stages)}
    if not keep:
        shutil.rmtree(work.parent, ignore_errors=True)
    return entry, extra


def growth(sizes: list[dict[str, Any]]) -> tuple[dict[str, Optional[float]], str]:
    """Log-log slope of each stage's seconds between the smallest and the largest size, and
    the stage that takes longest at the largest."""
    small, large = min(sizes, key=lambda s: s["rows"]), max(sizes, key=lambda s: s["rows"])
    slopes: dict[str, Optional[float]] = {}
    for stage in (*STAGES, "total"):
        a, b = small["seconds"][stage], large["seconds"][stage]
        if large["rows"] == small["rows"] or a <= 0 or b <= 0:
            slopes[stage] = None
            why = ("one size only" if large["rows"] == small["rows"] else
                   f"{a}s at {small['rows']:,} rows, {b}s at {large['rows']:,}")
            print(f"growth of {stage}: not defined ({why})")
            continue
        slopes[stage] = round(math.log(b / a) / math.log(large["rows"] / small["rows"]), 2)
    dominant = max(STAGES, key=lambda s: large["seconds"][s])
    return slopes, dominant


def table(sizes: list[dict[str, Any]], extras: list[dict[str, Any]]) -> str:
    cols = (*STAGES, "other", "total")
    lines = ["\nseconds per stage (other: Ray's start, worker groups, checkpoints, export, "
             "MLflow)", f"{'rows':>11}{'users':>9}{'items':>8}"
             + "".join(f"{c:>10}" for c in cols) + f"{'epochs':>8}{'samples/s':>11}"]
    for s, x in zip(sizes, extras):
        sec = s["seconds"]
        other = sec["total"] - sum(sec[k] for k in STAGES)
        lines.append(f"{s['rows']:>11,}{s['users']:>9,}{s['items']:>8,}"
                     + "".join(f"{sec[c] if c != 'other' else other:>10.1f}" for c in cols)
                     + f"{s['epochs']:>8}{s['samples_per_s']:>11,}")
    lines.append("\nper epoch: training s / evaluation s (validation recall@20); eval above "
                 "= the epochs' evaluations + the exported epoch's scoring")
    for s, x in zip(sizes, extras):
        cells = [f"{t:.1f}/{e:.1f} ({v:.3f})" if v is not None else f"{t:.1f}/{e:.1f}"
                 for (t, e), v in zip(x["per_epoch"], x["val"])]
        lines.append(f"{s['rows']:>11,}  " + "  ".join(cells) + f"; best {x['best_epoch']}, "
                     f"every test user ranked once: {x['exported']:.1f}s")
    lines.append("\npeak resident GB of one process (tree: the whole run at once); disk GB")
    lines.append(f"{'rows':>11}" + "".join(f"{k:>14}" for k in (*KINDS, "other", "tree"))
                 + f"{'disk':>8}  biggest outputs")
    for s, x in zip(sizes, extras):
        rss = [s["peak_rss_gb"][k] for k in KINDS] + [x["other_gb"], x["tree_gb"]]
        top = sorted(x["disk"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"{s['rows']:>11,}" + "".join(f"{v:>14.2f}" for v in rss)
                     + f"{s['disk_gb']:>8.2f}  "
                     + ", ".join(f"{k} {v / GB:.2f}" for k, v in top))
    lines.append("(object store: not measured apart; plasma pages count in the processes "
                 "that touch them)")
    lines.append("\nthe driver's peak resident GB by stage (of it, object-store pages it maps)")
    for s, x in zip(sizes, extras):
        lines.append(f"{s['rows']:>11,}  " + "  ".join(
            f"{stage} {rss / GB:.2f} ({shm / GB:.2f})"
            for stage, (rss, shm) in x["driver_stages"].items()))
    lines.append("\nthe baselines' share of the training stage (target <= 20%): " + ", ".join(
        f"{s['rows']:,} rows {s['baselines_share']:.0%}" for s in sizes))
    lines.append("\ntest recall@20, full-catalog ranking")
    for s in sizes:
        lines.append(f"{s['rows']:>11,}  " + "  ".join(
            f"{k} {v:.4f}" for k, v in s["test_recall@20"].items()))
    return "\n".join(lines)


def plot(sizes: list[dict[str, Any]], path: Path) -> None:
    """Seconds per stage against rows, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s["rows"] for s in sizes]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for stage in (*STAGES, "total"):
        points = [(r, s["seconds"][stage]) for r, s in zip(rows, sizes)
                  if s["seconds"][stage] > 0]
        if points:
            ax.plot(*zip(*points), marker="o", label=stage,
                    linestyle="--" if stage == "total" else "-")
    ax.set(xscale="log", yscale="log", xlabel="synthetic rows", ylabel="seconds",
           title="full run, default settings: seconds per stage")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1000000,3000000,10000000",
                   help="comma-separated synthetic sizes, one full run each")
    p.add_argument("--epochs", type=int, default=None,
                   help="--epochs of the full run (default: the run's own, early stopping)")
    p.add_argument("--sample-every", type=float, default=0.5,
                   help="seconds between memory samples of the run's processes")
    p.add_argument("--keep", action="store_true", help="keep each run's workdir")
    p.add_argument("--parallel", action="store_true",
                   help="run every size at once (they share the machine: --smoke's way of "
                        "checking the bench quickly, not a measurement)")
    p.add_argument("--cache", default=str(ROOT / ".bench"),
                   help="output folder: scale/scale.json and scale/scale.png go under it")
    p.add_argument("--plot", default=None, help="the plot's path (default: under --cache)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny sizes ({SMOKE}) in a temporary folder: checks the bench runs")
    parse_and_run(p, SMOKE, run)


def run(args: argparse.Namespace) -> None:
    rows = sorted({int(float(r)) for r in str(args.rows).split(",") if r.strip()})
    if not rows or min(rows) <= 0:
        raise SystemExit("--rows: name at least one positive size")
    out = Path(args.cache) / "scale"
    # each size's workdir and Ray session files: <scratch>/r<i>, a short path (Ray's Unix
    # sockets live under it, ~107 characters at most); a smoke's sandbox is short already
    scratch = Path(args.cache).parent if args.smoke else Path(tempfile.mkdtemp(prefix="sc"))
    def one(i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        entry, extra = measure(rows[i], args.epochs, scratch / f"r{i}", args.sample_every,
                               args.keep)
        titles = "; ".join(f"{k}: {', '.join(sorted(v)) or '-'}"
                           for k, v in extra["titles"].items())
        print(f"  {rows[i]:>10,} processes seen: {titles}", flush=True)
        return entry, extra

    try:
        if args.parallel:
            with ThreadPoolExecutor(len(rows)) as pool:
                done = list(pool.map(one, range(len(rows))))
        else:
            done = [one(i) for i in range(len(rows))]
    finally:
        if not args.keep and not args.smoke:  # (the sandbox removes its own)
            shutil.rmtree(scratch, ignore_errors=True)
    sizes, extras = [d[0] for d in done], [d[1] for d in done]
    slopes, dominant = growth(sizes)
    print(table(sizes, extras))
    print("\ngrowth exponent (seconds ~ rows^k, smallest to largest size): "
          + ", ".join(f"{k} {v if v is not None else '-'}" for k, v in slopes.items()))
    print(f"dominant stage at {sizes[-1]['rows']:,} rows: {dominant}")
    result = {"sizes": sizes, "growth_exponent": slopes, "dominant_stage": dominant}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_path = Path(args.plot) if args.plot else out / "scale.png"
    plot(sizes, plot_path)
    print(f"wrote {out / 'scale.json'} and {plot_path}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
