"""Browser check of a tracking store: what a newcomer sees in ``mlflow ui`` after the main job.

Starts ``mlflow server`` (what ``mlflow ui`` runs) on 127.0.0.1 against the store, opens its pages with
headless Chromium (Debian ``chromium``) and, for each page, saves a screenshot and the rendered DOM
(``--dump-dom``) into the output folder, then asserts that the DOM shows what the store holds:

* ``experiments``: the experiment list names every ``ichflow-<task>`` experiment;
* ``artifacts-<task>``: a run's artifacts page with its confusion-matrix figure selected: the figure's file
  name is in the tree and the image is rendered (``<img alt="figures/...confusion....png">``);
* ``run-<task>``: that run's overview page: its name, the first line of its description (the
  ``mlflow.note.content`` tag: the test and val headline) and the first row of its headline table, e.g.
  ``f1 0.818 [0.667, 1.000] 0.818 [0.800, 0.833]``;
* ``model-<name>``: the registered model page of every ``ich-*`` model with ``@champion``: name and alias;
* ``version-<name>``: the page of that model's ``@champion`` version (the newest one when the quality gate
  left it without a champion): its number and the first line of its description (the decision);
* ``study``: the runs of experiment ``ichflow-tune``: the newest ``tune`` run (the Optuna study), its trials
  nested under it; ``study-trial``: a trial run's page, naming the study as its parent run.

Usage (from the project root; the venv's python)::

    .venv/bin/python scripts/browser_check.py [--tracking-uri sqlite:///mlflow.db] [--out work/browser-check]

Exit code 0 when every check passes, 1 otherwise (the report ``report.md`` / ``report.json`` in the output
folder lists each page, its URL, the expected strings and what was missing). Expected strings are looked for in
the page's text (tags, scripts and styles dropped, entities decoded, whitespace collapsed) and in the raw DOM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from html import unescape
from pathlib import Path

from ichflow.tasks.spec import TASKS as TASK_SPECS

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=15000",
                  "--window-size=1440,1000", "--hide-scrollbars"]
TASKS = tuple(TASK_SPECS)


def find_chromium(explicit: str = "") -> str:
    for name in ([explicit] if explicit else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("error: chromium not found (Debian: apt-get install -y chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(uri: str, port: int, log: Path, timeout: float = 180.0) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop_server(proc)
                sys.exit(f"error: mlflow server did not start (see {log}):\n{log.read_text()[-2000:]}")
            time.sleep(1)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)   # its own session: the server and its uvicorn workers
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(30)


def capture(chromium: str, url: str, png: Path, html: Path, tries: int = 2) -> str:
    """Screenshot + rendered DOM of ``url`` in one headless run, with a fresh profile each time."""
    dom = ""
    for _ in range(tries):
        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
            proc = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                                   "--dump-dom", url], capture_output=True, text=True, timeout=180)
        dom = proc.stdout
        if png.exists() and len(dom) > 1000:
            break
    html.write_text(dom)
    return dom


def page_text(dom: str) -> str:
    """The text a reader sees: rendered Markdown splits one line into ``<strong>``, ``<code>``... elements, so
    expected text is matched with tags dropped (scripts and styles with their content: not on screen)."""
    text = re.sub(r"<(script|style)\b.*?</\1\s*>", " ", dom, flags=re.S | re.I)
    text = unescape(re.sub(r"<[^>]*>", "", text))
    return re.sub(r"\s+", " ", text.replace("\u00a0", " "))


def plain(markdown: str) -> str:
    """A Markdown line as its rendering reads (the markup our descriptions use: bold, code)."""
    return re.sub(r"\s+", " ", markdown.replace("**", "").replace("`", "")).strip()


def headline_row(note: str) -> str:
    """The first row of a run description's headline table as the page reads it (``f1 0.818 [0.667, 1.000]
    0.818 [0.800, 0.833]``: the renderer puts a newline between cells); "" when it has no table. The whole row,
    name and values, so that a bare number elsewhere on the page (the metrics list) cannot pass for it."""
    rows = [line for line in note.splitlines() if line.startswith("|")]
    if len(rows) < 3:   # header, |---|, then the first metric
        return ""
    return " ".join(plain(cell) for cell in rows[2].strip().strip("|").split("|"))


def run_page(exp_id: str, run, task: str, problems: list[str]) -> dict:
    """The run's overview page: its name and the headline of its description."""
    note = run.data.tags.get("mlflow.note.content", "")
    # the first line is what shows while the UI keeps the description folded: the test/val headline
    expect = [run.info.run_name, plain(note.split("\n")[0])]
    headline = headline_row(note)
    if headline:
        expect.append(headline)
    else:
        problems.append(f"run {run.info.run_id} of ichflow-{task} has no description with a headline table")
    return {"name": f"run-{task}", "route": f"#/experiments/{exp_id}/runs/{run.info.run_id}", "expect": expect,
            "run_id": run.info.run_id}


def version_page(name: str, version, problems: list[str]) -> dict:
    """A model version's page: its number and the first line of its description (the promotion decision)."""
    expect = [f"Version {version.version}"]
    first = plain((version.description or "").strip().split("\n")[0])
    if first:
        expect.append(first)
    else:
        problems.append(f"model version {name}/{version.version} has no description")
    return {"name": f"version-{name}", "route": f"#/models/{name}/versions/{version.version}", "expect": expect,
            "run_id": version.run_id}


def plan(uri: str, tasks: list[str], study: bool = True) -> tuple[list[dict], list[str]]:
    """Pages to open and what each must show, from the store itself; plus problems found in the store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    problems, pages = [], []
    exps = {e.name: e for e in client.search_experiments()}
    wanted = [f"ichflow-{t}" for t in tasks]
    missing = [n for n in wanted if n not in exps]
    if missing:
        problems.append(f"store has no experiment {missing}")
    pages.append({"name": "experiments", "route": "#/experiments", "expect": [n for n in wanted if n in exps]})

    for task in tasks:
        exp = exps.get(f"ichflow-{task}")
        if exp is None:
            continue
        found = None
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=50)
        # the task's own runs first, newest first; runs nested under another run of this experiment (CV folds,
        # trials) after them (a pipeline step's parent is the pipeline run, in another experiment)
        ids = {r.info.run_id for r in runs}
        for run in sorted(runs, key=lambda r: r.data.tags.get("mlflow.parentRunId") in ids):
            figs = [a.path for a in client.list_artifacts(run.info.run_id, "figures")
                    if "confusion" in a.path and a.path.endswith(".png")]
            if figs:
                found = (run, sorted(figs, key=lambda p: ("test" not in p, p))[0])
                break
        if found is None:
            problems.append(f"no finished run of ichflow-{task} has a figures/*confusion*.png artifact")
            continue
        run, fig = found
        pages.append({"name": f"artifacts-{task}", "route": f"#/experiments/{exp.experiment_id}/runs/"
                      f"{run.info.run_id}/artifacts/{fig}", "expect": [Path(fig).name, f'alt="{fig}"'],
                      "run_id": run.info.run_id})
        pages.append(run_page(exp.experiment_id, run, task, problems))

    for task in tasks:
        name = TASK_SPECS[task].registered_name
        try:
            champ = client.get_model_version_by_alias(name, "champion")
        except MlflowException:
            champ = None
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            problems.append(f"registered model {name} has no version")
            continue
        newest = max(versions, key=lambda v: int(v.version))
        if champ is None and newest.tags.get("ichflow.decision") not in ("below_floor", "degenerate"):
            problems.append(f"registered model {name} has no @champion, and its newest version was not stopped by "
                            "the quality gate")
            continue
        expect = [name] + (["champion", f"Version {champ.version}"] if champ else [f"Version {newest.version}"])
        pages.append({"name": f"model-{name}", "route": f"#/models/{name}", "expect": expect})
        pages.append(version_page(name, champ or newest, problems))

    tune = exps.get("ichflow-tune")
    if not study:
        return pages, problems
    studies = client.search_runs([tune.experiment_id], "tags.`ichflow.task` = 'tune' and attributes.status = 'FINISHED'",
                                 order_by=["attributes.start_time DESC"], max_results=1) if tune else []
    if studies:
        study = studies[0]
        trials = client.search_runs([tune.experiment_id], f"tags.mlflow.parentRunId = '{study.info.run_id}'")
        names = sorted(t.info.run_name for t in trials if t.info.run_name)
        if not names:
            problems.append(f"study run {study.info.run_id} has no nested trial runs")
        # the runs list shows the study with its trials folded under it (an expander); a trial's own page
        # names the study as its parent run
        pages.append({"name": "study", "route": f"#/experiments/{tune.experiment_id}/runs",
                      "expect": [study.info.run_name, "matching runs"], "run_id": study.info.run_id})
        if trials:
            trial = sorted(trials, key=lambda t: t.info.start_time)[0]
            pages.append({"name": "study-trial", "route": f"#/experiments/{tune.experiment_id}/runs/"
                          f"{trial.info.run_id}", "expect": [trial.info.run_name, "Parent run", study.info.run_name],
                          "run_id": trial.info.run_id})
    else:
        problems.append("no finished tune run (study) in experiment ichflow-tune")
    return pages, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    ap.add_argument("--out", default="work/browser-check")
    ap.add_argument("--tasks", default=",".join(TASKS), help="tasks whose experiment/model must be shown")
    ap.add_argument("--study", default="true", help="also check the newest tune study (true/false)")
    ap.add_argument("--chromium", default="")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        if old.is_file():
            old.unlink()
    chromium = find_chromium(args.chromium)
    tasks = [t for t in args.tasks.split(",") if t]
    pages, problems = plan(args.tracking_uri, tasks, study=args.study.lower() == "true")
    port = args.port or free_port()
    server = start_server(args.tracking_uri, port, out / "mlflow-server.log")
    results = []
    try:
        for page in pages:
            url = f"http://127.0.0.1:{port}/{page['route']}"
            png, html = out / f"{page['name']}.png", out / f"{page['name']}.html"
            t0 = time.time()
            dom = capture(chromium, url, png, html)
            text = page_text(dom)
            missing = [e for e in page["expect"] if e not in text and e not in dom]
            results.append({**page, "url": url, "png": str(png), "seconds": round(time.time() - t0, 1),
                            "dom_bytes": len(dom), "screenshot": png.exists(), "missing": missing,
                            "ok": png.exists() and not missing})
            print(f"[browser-check] {page['name']:<32} {'ok' if results[-1]['ok'] else 'FAIL'}  {url}"
                  + (f"  missing {missing}" if missing else ""))
    finally:
        stop_server(server)

    ok = not problems and all(r["ok"] for r in results)
    (out / "report.json").write_text(json.dumps({"tracking_uri": args.tracking_uri, "ok": ok, "problems": problems,
                                                 "pages": results}, indent=2))
    lines = [f"# Browser check of {args.tracking_uri}: {'PASS' if ok else 'FAIL'}", "",
             "| page | ok | screenshot | expected in DOM | missing |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {'yes' if r['ok'] else 'NO'} | {Path(r['png']).name} | "
              f"{', '.join(f'`{e}`' for e in r['expect'])} | {', '.join(r['missing'])} |" for r in results]
    lines += ["", *[f"- store problem: {p}" for p in problems]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    for p in problems:
        print(f"[browser-check] store problem: {p}")
    print(f"[browser-check] {'PASS' if ok else 'FAIL'}: {len(results)} pages, screenshots in {out}/")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
