"""What a search writes to ``WORKDIR/search/<study>/`` after every trial, atomically (any worker may write it):

* ``best_overrides.json``: the best trial's values as an override file (``train --set-file``, ``plan --set-file``);
* ``trials.csv``: one row per trial (number, state, value, drawn values, seconds, epochs, worker, folder, retry of);
* ``history.png``: every trial's value over the search's wall-clock time, with the best so far;
* ``importance.png``: each parameter's importance (Optuna's PED-ANOVA) once enough trials finished;
* ``report.html``: the best trial, the command that trains with it, both pictures and the trial table;
* ``search.json``: the summary (best trial, counts per state, files).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from decathlete.io.atomic import write_atomic, write_json_atomic  # noqa: E402
from decathlete.search.samplers import best_trial  # noqa: E402
from decathlete.search.study import Setup, counts, overrides_of  # noqa: E402

COLOURS = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red"}


def write_outputs(setup: Setup, study: optuna.Study) -> dict[str, Any]:
    """Write every output of the study so far; returns the summary (``search.json``)."""
    folder = setup.folder
    folder.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    files = {"trials": _write_csv(folder / "trials.csv", trials, setup)}
    files["history"] = _save_png(folder / "history.png", history_figure(trials, setup.options.metric))
    importances = parameter_importances(study)
    if importances:
        files["importance"] = _save_png(folder / "importance.png", importance_figure(importances))
    summary: dict[str, Any] = {"study": setup.study_name, "storage": setup.storage_url, "workdir": str(setup.workdir),
                               **setup.settings(), "sampler": setup.options.sampler, "trials_wanted":
                               setup.options.trials, "counts": counts(study), "importances": importances, "best": None}
    if best is not None:
        overrides = overrides_of(setup, best.params)
        files["best_overrides"] = str(folder / "best_overrides.json")
        write_json_atomic(folder / "best_overrides.json", overrides)
        summary["best"] = {"trial": best.number, "value": best.value, "overrides": overrides,
                           "folder": best.user_attrs.get("folder"), "per_label": best.user_attrs.get("per_label"),
                           "command": train_command(setup)}
    summary["files"] = files
    files["report"] = str(folder / "report.html")
    _write_html(folder / "report.html", summary, trials, setup)
    write_json_atomic(folder / "search.json", summary)
    return summary


def train_command(setup: Setup) -> str:
    """The command that trains the fold with the best values (as long as the trial budget; drop the budget to train
    the plan's full schedule)."""
    o = setup.options
    return (f"decathlete train {setup.workdir} -c {o.configuration} -f {o.fold} --recipe {setup.recipe.name} "
            f"--set-file {setup.folder / 'best_overrides.json'}")


def _row(trial: FrozenTrial, setup: Setup) -> dict[str, Any]:
    a = trial.user_attrs
    worker = a.get("worker") or {}
    drawn = setup.space.decode(trial.params)
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else None
    value = trial.value if trial.state == TrialState.COMPLETE else None
    return {"number": trial.number, "state": trial.state.name, "value": value,
            "last_pseudo_dice": _last_reported(trial),
            **{name: json.dumps(v) if isinstance(v, (list, dict)) else v for name, v in drawn.items()},
            "baseline": bool(a.get("baseline")), "train_seconds": a.get("train_seconds"),
            "validation_seconds": a.get("validation_seconds"), "seconds": seconds, "epochs": a.get("epochs"),
            "steps": a.get("steps"), "last_epoch_reported": max(trial.intermediate_values, default=None),
            "note": a.get("note"),
            "retry_of": trial.system_attrs.get("failed_trial"),
            "worker": f"{worker.get('host')}:{worker.get('pid')}" if worker else None,
            "started": trial.datetime_start.isoformat() if trial.datetime_start else None, "folder": a.get("folder")}


def _write_csv(path: Path, trials: list[FrozenTrial], setup: Setup) -> str:
    rows = [_row(t, setup) for t in trials]
    columns = list(dict.fromkeys(k for row in rows for k in row)) if rows else ["number", "state", "value"]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)
    return str(path)


def history_figure(trials: list[FrozenTrial], metric: str) -> Any:
    """Trial values against minutes since the first trial started, coloured by state, with the best so far."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    done = [t for t in trials if t.datetime_start is not None and t.datetime_complete is not None]
    if done:
        origin = min(t.datetime_start for t in done)
        minutes = {t.number: (t.datetime_complete - origin).total_seconds() / 60 for t in done}
        for state, colour in COLOURS.items():
            chosen = [t for t in done if t.state.name == state]
            values = [t.value if t.value is not None else _last_reported(t) for t in chosen]
            points = [(minutes[t.number], v) for t, v in zip(chosen, values) if v is not None]
            if points:
                ax.scatter(*zip(*points), c=colour, s=18, label=state.lower() + (" (last pseudo-Dice)" if state !=
                                                                               "COMPLETE" else ""))
        complete = sorted((t for t in done if t.state == TrialState.COMPLETE), key=lambda t: minutes[t.number])
        best, steps = float("-inf"), []
        for t in complete:
            best = max(best, t.value)
            steps.append((minutes[t.number], best))
        if steps:
            ax.step(*zip(*steps), where="post", c="k", lw=1, label="best so far")
        ax.legend(fontsize=7)
    ax.set_xlabel("minutes since the first trial started")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("trials over time", fontsize=9)
    return fig


def _last_reported(trial: FrozenTrial) -> float | None:
    return trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None


def parameter_importances(study: optuna.Study) -> dict[str, float]:
    """PED-ANOVA importances (Optuna's default), or nothing while too few trials finished to estimate them."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}


def importance_figure(importances: dict[str, float]) -> Any:
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (PED-ANOVA, normalised)")
    ax.set_title("parameter importances", fontsize=9)
    return fig


def _save_png(path: Path, fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return str(path)


def _write_html(path: Path, summary: dict[str, Any], trials: list[FrozenTrial], setup: Setup) -> None:
    encoded = [base64.b64encode(Path(summary["files"][k]).read_bytes()).decode()
               for k in ("history", "importance") if k in summary["files"]]
    pictures = "".join(f'<img src="data:image/png;base64,{picture}">' for picture in encoded)
    rows = [_row(t, setup) for t in trials]
    columns = list(dict.fromkeys(k for row in rows for k in row if k not in ("folder", "started")))
    table = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns) + "</tr>" for row in rows)
    best = summary["best"]
    best_html = "<p>no trial has finished yet</p>" if best is None else (
        f"<p>Trial {best['trial']}: validation {html.escape(setup.options.metric)} {best['value']:.4f}.</p>"
        f"<pre>{html.escape(json.dumps(best['overrides'], indent=1))}</pre>"
        f"<p>Train with it:</p><pre>{html.escape(best['command'])}</pre>")
    document = f"""<!doctype html><html><head><meta charset="utf-8"><title>decathlete search</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid
#999;padding:3px 6px;text-align:right}}</style></head><body>
<h1>decathlete search: {html.escape(setup.study_name)}</h1>
<p>Recipe {html.escape(setup.recipe.name)}, configuration {html.escape(setup.options.configuration)}, fold
{setup.options.fold}; {setup.budget_s:.0f} s of training per trial; sampler {html.escape(setup.options.sampler)};
trials by state: {html.escape(json.dumps(summary['counts']))}. Values are the mean foreground
{html.escape(setup.options.metric)} of the fold's validation cases, predicted from the raw images.</p>
<h2>Best trial</h2>{best_html}<h2>Trials</h2>{pictures}<table>{table}</table></body></html>"""
    write_atomic(path, lambda tmp: tmp.write_text(document))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
