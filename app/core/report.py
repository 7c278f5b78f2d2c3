"""The closing report of a full run: a stage table, the model against the popularity, EASE and
iALS baselines (with a verdict against the best that ran), example recommendations, where every
output is, and a plot of validation metrics per epoch."""

from __future__ import annotations

from typing import Any

import pandas as pd

UNITS = {"prepare": "rows", "tune": "trials", "train": "samples", "refit": "samples",
         "infer": "users"}
BASELINES = (("popularity", "popularity"), ("ease", "EASE"), ("ials", "iALS"))


def plot_history(history: list[dict[str, Any]], path: Any, ks: list[int]) -> None:
    """Validation Recall@K and NDCG@K per epoch; the popularity baseline dashed, EASE dotted,
    iALS dash-dotted (those that ran).
    ``path``: a PNG file's path or URI."""
    import io

    import matplotlib

    from app.core.storage import resolve

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("recall", "ndcg")):
        for k in ks:
            line, = ax.plot(epochs, [h.get(f"val_{name}@{k}") for h in history], marker="o",
                            label=f"model {name}@{k}")
            for (key, label), style in zip(BASELINES, ("--", ":", "-.")):
                value = history[-1].get(f"{key}_val_{name}@{k}")
                if value is not None:
                    ax.axhline(value, linestyle=style, color=line.get_color(), alpha=0.7,
                               label=f"{label} {name}@{k}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {name}@K")
        ax.set_xticks(epochs)
        ax.legend(fontsize=7)
    fig.suptitle("two-tower model vs the baselines (validation split)")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    resolve(path).write_bytes(png.getvalue())


def examples(recommendations: Any, users: int = 3, k: int = 5) -> str:
    """The ``users`` smallest user ids' top ``k`` items (with titles when known), as text, from
    a recommendations folder (a path, URI or :class:`~app.core.storage.Location`).

    The folder is scanned, not loaded: one pass over the ``userId`` column a batch at a time
    finds the users, then only their first ``k`` rows are read (at 10M ratings the folder holds
    20M rows, several GB as a DataFrame)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from app.core.storage import resolve

    loc = resolve(recommendations)
    data = ds.dataset(loc.path, filesystem=loc.fs, format="parquet")
    first: list[Any] = []
    for batch in data.to_batches(columns=["userId"]):
        ids = pc.unique(batch.column(0).drop_null()).to_pylist()
        first = sorted(set(first).union(ids))[:users]
    if not first:
        return "  (no recommendations)"
    df = data.to_table(filter=pc.field("userId").isin(first) & (pc.field("rank") <= k)
                       ).to_pandas()
    lines = []
    for user in first:
        rows = df[df["userId"] == user].sort_values("rank")
        titles = rows["title"] if "title" in rows else pd.Series([None] * len(rows))
        names = [str(t) if pd.notna(t) else str(m)
                 for m, t in zip(rows["movieId"], titles.to_numpy())]
        lines.append(f"  user {user}: " + "; ".join(names))
    return "\n".join(lines)


def comparison(m: dict[str, Any], split: str = "test") -> list[str]:
    """The model beside popularity, EASE and iALS on one split, with ratios, and a verdict line
    against the best baseline that ran on Recall@20 (or the first Recall@K); a skipped one
    says why."""
    bases = [(key, label) for key, label in BASELINES if m.get(key, {}).get(split)]
    head = f"  {'metric':<10}{'model':>8}" + "".join(f"{label:>12}{'ratio':>8}"
                                                   for _, label in bases)
    users = m["model"][split].get("users")
    out = [f"{split} split, full-catalog ranking" + (f" over {users:,} users" if users else "")
           + f" (best epoch {m.get('best_epoch', '?')} of {m.get('epochs', '?')}): the model "
           f"vs the baselines", head]
    keys = sorted((k for k in m["model"][split] if "@" in k),
                  key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    for key in keys:
        model = m["model"][split][key]
        row = f"  {key:<10}{model:>8.4f}"
        for base, _ in bases:
            b = m[base][split].get(key, float("nan"))
            row += f"{b:>12.4f}{(f'{model / b:.2f}x' if b else '-'):>8}"
        out.append(row)
    for base, label in BASELINES:
        if m.get(base, {}).get("skipped"):
            out.append(f"  {label} skipped: {m[base]['skipped']}")
    key = "recall@20" if "recall@20" in m["model"][split] else next(
        (k for k in keys if k.startswith("recall@")), None)
    if key and bases:
        name, label = max(bases, key=lambda b: m[b[0]][split].get(key, float("-inf")))
        model, best = m["model"][split][key], m[name][split][key]
        verdict = "beats" if model > best else ("ties" if model == best else "is below")
        out.append(f"verdict: the model {verdict} the best baseline ({label}) on {split} "
                   f"{key}: {model:.4f} vs {best:.4f} ({model / best:.2f}x)" if best else
                   f"verdict: the model scores {model:.4f} on {split} {key}")
    return out


def render(summary: dict[str, Any]) -> str:
    """The report as text (see :func:`pipelines.full_run.run` for the summary's shape)."""
    bar = "=" * 78
    out = [bar, f"{'stage':<10}{'seconds':>10}{'count':>14}{'per second':>14}  unit"]
    for name, st in summary["stages"].items():
        rate = st["rows"] / st["seconds"] if st["seconds"] else float("nan")
        out.append(f"{name:<10}{st['seconds']:>10.1f}{st['rows']:>14,}{rate:>14,.1f}  "
                   f"{UNITS.get(name, 'rows')}")
    stages = summary["stages"]
    if "train" in stages:
        out.append("")
        out += comparison(stages["train"]["metrics"])
        if stages["train"]["metrics"].get("init_from"):
            out.append(f"warm start: from {stages['train']['metrics']['init_from']} (its "
                       f"rows copied by id, new ids fresh)")
    if "refit" in stages:
        r = stages["refit"]
        out.append(f"served model: refit on every split ({r['training_rows']:,} rows, "
                   f"{r['epochs']} epoch(s)); the figures above are the held-out run's")
    if "infer" in stages and summary.get("examples"):
        out.append("")
        out.append("example recommendations:")
        out.append(summary["examples"])
    out.append("")
    out.append("outputs:")
    served = stages.get("refit", stages.get("train", {})).get("mlflow")
    for label, key in (("dataset", "prepare"), ("sweep", "tune"),
                       ("model", "refit" if "refit" in stages else "train"),
                       ("recommendations", "infer")):
        if key in stages:
            run = f" (MLflow run {served['run_id']})" if label == "model" and served else ""
            out.append(f"  {label:<18}{stages[key]['output']}{run}")
    if "train" in stages:
        if "refit" in stages:
            ml = stages["train"]["mlflow"]
            out.append(f"  {'held-out model':<18}{stages['train']['output']} "
                       f"({ml['registered_uri']}, MLflow run {ml['run_id']})")
        out.append(f"  {'registered model':<18}{served['registered_uri']}")
        if summary.get("promotion"):
            p = summary["promotion"]
            out.append(f"  {'alias @' + p['alias']:<18}"
                       + (f"version {p['version']} (promoted: {p['reason']})" if p["promoted"]
                          else f"version {p['champion'] or '-'} kept ({p['reason']})"))
        out.append(f"  {'mlflow store':<18}{summary.get('tracking_uri', '')}")
    plot = f" (plot: {summary['plot']})" if summary.get("plot") else ""
    out.append(f"  {'summary':<18}{summary['workdir']}/summary.json{plot}")
    out.append(bar)
    return "\n".join(out)
