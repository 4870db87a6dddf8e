"""Section 4: per-slice latency (p50/p95) and 32-slice scan throughput of each task's pyfunc model.

Models: the ones the pipeline section trained in the same invocation (``--models`` from the runner), a URI
given with ``--model task=URI`` (e.g. ``models:/ich-segmentation@champion``), or else a tiny model trained
here on the synthetic phantom (latency depends on the architecture and input size, not on how long it
trained). Input: real 512×512 slices of a 32-slice synthetic scan (uint8, the served contract).

In-process: ``mlflow.pyfunc.load_model(uri).predict(array, params=...)``, with the compact row's params (the
same answer). Served: a real ``mlflow models serve`` process per model (``--env-manager local``, 127.0.0.1, the
venv's ``bin`` first on PATH), all started together, measured one after the other, with two payloads
(docs/serving.md), each serialised once (PNG encoding included), the timed part being the HTTP request, the
server's work and parsing the JSON answer:

- ``served_png``: the compact contract, ``{"inputs": ["<base64 PNG>", ...]}`` (one string per slice, the scan
  as its 32 PNGs: the same 8-bit slices the in-process call gets; a base64 NIfTI would carry HU, a different
  input); segmentation asks for ``output=mask_png`` since its default answer is a float per pixel. Its p50
  over the in-process p50 is the task's ``served_png_p50_ratio``, ``target`` says whether it is within
  :data:`~benchmarks.core.GOAL_SERVED_RATIO`.
- ``served``: the integer tensor ``{"inputs": slices.tolist()}`` (1 MB per slice), the model's default answer,
  as in earlier runs (kept so they stay comparable).

Request and answer sizes in bytes are recorded for both.

Detection is measured last in-process (Ultralytics' predictor set-up pins torch to ``cpu_count - 1`` threads;
our predictor puts the process's count back, but the order keeps older runs comparable); the thread count is
recorded per task.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.core import GOAL_SERVED_RATIO, TASKS, percentile, served_png_ratio

# params of the compact row: segmentation's default answer (float32 per pixel, ~2 MB of JSON per slice) would
# dominate the time; a client that wants speed asks for the mask as a PNG
COMPACT_PARAMS = {"segmentation": {"output": "mask_png"}}


def tiny_config(task: str):
    if task == "segmentation":
        from ichflow.tasks.segmentation import SegmentationConfig
        return SegmentationConfig(epochs=1, steps_per_epoch=2, batch_size=4, patch_size=64, eval_batch_size=4)
    if task == "classification":
        from ichflow.tasks.classification import ClassificationConfig
        return ClassificationConfig(epochs=1, steps_per_epoch=2, n_boot=0, gradcam_per_group=0)
    if task == "multilabel":
        from ichflow.tasks.multilabel import MultilabelConfig
        return MultilabelConfig(n_folds=3, epochs=1, steps_per_epoch=2)
    if task == "detection":
        from ichflow.tasks.detection.config import DetectionConfig
        return DetectionConfig(epochs=1, overlays=0)
    raise ValueError(task)


def train_tiny(task: str) -> str:
    from benchmarks.pipeline import train_fn

    return train_fn(task)(tiny_config(task))["model_uri"]


def scan_32() -> "np.ndarray":  # noqa: F821
    from ichflow.data.synthetic import PhantomSpec, ensure_synthetic
    from ichflow.serving import discover_scans, load_scan

    folder = ensure_synthetic("phe", PhantomSpec(n_patients=2, n_slices=32))
    scans = discover_scans(folder)
    return load_scan(next(iter(scans.values())))


def _timed(fn, n: int, warm: int = 2) -> list[float]:
    for _ in range(warm):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _summary(single: list[float], scans: list[float], n_slices: int) -> dict:
    scan_med = percentile(scans, 50)
    return {"p50_ms": 1000 * percentile(single, 50), "p95_ms": 1000 * percentile(single, 95),
            "single_ms_runs": [round(1000 * s, 2) for s in single], "scan_seconds": scan_med,
            "scan_seconds_runs": [round(s, 3) for s in scans], "scan_slices_per_s": n_slices / scan_med}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, timeout: float = 600) -> tuple[object, int]:
    """(parsed JSON answer, answer bytes)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw), len(raw)


def png_b64(slice_u8) -> str:
    """One uint8 slice as a base64 PNG, as a client would send it (docs/serving.md)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(slice_u8).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _body(inputs, params: dict | None = None) -> bytes:
    return json.dumps({"inputs": inputs, **({"params": params} if params else {})}).encode()


def _time_posts(url: str, body: bytes, n: int, warm: int) -> tuple[list[float], int]:
    """Seconds of ``n`` POSTs of ``body`` and the answer's size in bytes (the same answer every time)."""
    sizes = []
    times = _timed(lambda: sizes.append(_post(url, body)[1]), n, warm)
    return times, sizes[-1]


def _served_row(url: str, body1: bytes, body32: bytes, n_single: int, n_scan: int, n_slices: int) -> dict:
    lat, answer1 = _time_posts(url, body1, n_single, warm=2)
    scans, answer32 = _time_posts(url, body32, n_scan, warm=0)  # already warm from the single slices
    return {**_summary(lat, scans, n_slices), "payload_bytes_single": len(body1), "payload_bytes_scan": len(body32),
            "answer_bytes_single": answer1, "answer_bytes_scan": answer32}


def _target(entry: dict) -> dict:
    """The issue's goal for the compact payload: served p50 per slice within GOAL_SERVED_RATIO × in-process."""
    r = served_png_ratio(entry)
    measured = math.isfinite(r)  # NaN when either p50 is missing (a task or its server failed)
    return {"served_png_p50_ratio": r if measured else None,
            "target": {"max_ratio": GOAL_SERVED_RATIO, "met": (r <= GOAL_SERVED_RATIO) if measured else None}}


def run(quick: bool, models: dict) -> dict:
    import mlflow
    import numpy as np
    import torch

    n_single, n_scan = (8, 1) if quick else (15, 2)
    scan = scan_32()
    single = np.ascontiguousarray(scan[len(scan) // 2: len(scan) // 2 + 1])
    pngs = [png_b64(s) for s in scan]                      # encoded once: the client's work, not the server's
    png_single = [png_b64(single[0])]
    out: dict = {"tasks": {}, "calls": n_single, "scan_calls": n_scan, "scan_shape": list(scan.shape)}
    uris = {}
    for task in TASKS:
        entry = out["tasks"].setdefault(task, {})
        try:
            if models.get(task):
                uris[task] = models[task]
                entry["model_source"] = "given"
            else:
                t0 = time.perf_counter()
                uris[task] = train_tiny(task)
                entry["model_source"] = f"tiny model trained here ({time.perf_counter() - t0:.0f} s)"
            entry["model_uri"] = uris[task]
            t0 = time.perf_counter()
            model = mlflow.pyfunc.load_model(uris[task])
            entry["load_seconds"] = time.perf_counter() - t0
            params = COMPACT_PARAMS.get(task)   # the answer the compact served row asks for: like for like
            lat = _timed(lambda: model.predict(single, params=params), n_single)
            scans = _timed(lambda: model.predict(scan, params=params), n_scan, warm=0)  # warm from the slices
            entry["in_process"] = {**_summary(lat, scans, len(scan)), "torch_threads": torch.get_num_threads()}
        except Exception as exc:  # noqa: BLE001 - one task failing must not lose the others
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            uris.pop(task, None)

    # ---- served: start every server at once (start-up is mostly imports), then measure one at a time
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    servers = {}
    for task, uri in uris.items():
        port = _free_port()
        log = open(f"serve-{task}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                                 "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        servers[task] = (proc, port, time.perf_counter(), log)
    try:
        ready: dict[str, float] = {}
        deadline = time.perf_counter() + 420
        while time.perf_counter() < deadline and len(ready) < len(servers):
            for task, (proc, port, t_start, log) in servers.items():
                if task in ready or proc.poll() is not None:
                    continue
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                        ready[task] = time.perf_counter() - t_start
                except OSError:
                    pass
            if all(t in ready or servers[t][0].poll() is not None for t in servers):
                break
            time.sleep(0.5)
        for task in TASKS:
            if task not in servers:
                continue
            proc, port, t_start, log = servers[task]
            entry = out["tasks"][task]
            served: dict = {}
            entry["served"] = served
            base = f"http://127.0.0.1:{port}"
            if task not in ready:
                served["error"] = "server did not answer /ping: " + Path(log.name).read_text()[-400:]
                continue
            served["startup_seconds"] = ready[task]
            served["started_together"] = len(servers)
            url = f"{base}/invocations"
            # compact first: the headline figure is not measured right after 30 MB answers of the old payload
            params = COMPACT_PARAMS.get(task, {})
            compact: dict = {"payload": "base64 PNG per slice", "params": params}
            entry["served_png"] = compact
            try:
                compact.update(_served_row(url, _body(png_single, params), _body(pngs, params), n_single, n_scan,
                                           len(scan)))
            except Exception as exc:  # noqa: BLE001 - keep the integer-tensor row
                compact["error"] = f"{type(exc).__name__}: {exc}"[:500]
            try:
                served.update(_served_row(url, _body(single.tolist()), _body(scan.tolist()), n_single, n_scan,
                                          len(scan)))
            except Exception as exc:  # noqa: BLE001
                served["error"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        for proc, _, _, log in servers.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc, _, _, log in servers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
    for entry in out["tasks"].values():
        entry.update(_target(entry))
    out["tasks"] = {t: out["tasks"][t] for t in TASKS if t in out["tasks"]}
    return out
