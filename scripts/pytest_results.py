"""pytest plugin for scripts/gpu_check.sh: one JSON line per finished test, written as it happens.

Enable with ``-p pytest_results`` (scripts/ on PYTHONPATH) and ``MIXKERNELS_RESULTS=<file.jsonl>``
(``MIXKERNELS_RESULTS_STEP`` labels the lines). Only the controlling process writes (with
pytest-xdist every worker's reports arrive there), so lines never interleave, and a run cut
short by a time limit keeps every line written before it: junit XML is written only at the end.
Line: ``{"step", "nodeid", "outcome": passed|failed|skipped|error, "seconds", "message"}``.
"""
import json
import os
import re

_OUT = None
_STEP = ""
_PHASES = {}


def pytest_configure(config):
    global _OUT, _STEP
    path = os.environ.get("MIXKERNELS_RESULTS")
    if path and not hasattr(config, "workerinput"):  # xdist workers have workerinput
        _OUT = open(path, "a", buffering=1)
        _STEP = os.environ.get("MIXKERNELS_RESULTS_STEP", "")


def _message(report, limit=1500):
    text = getattr(report, "longreprtext", "") or ""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])[:limit]
    lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
    msg = "\n".join(lines[:12]) if lines else "\n".join(text.splitlines()[-12:])
    crash = re.search(r"\[gw\d+\] node down: .*|worker '.*' crashed.*", text)
    if crash:
        msg = crash.group(0) + "\n" + msg
    return msg[:limit]


def _write(rec):
    if _OUT is not None:
        _OUT.write(json.dumps(rec) + "\n")


def pytest_runtest_logreport(report):
    if _OUT is None:
        return
    if report.when not in ("setup", "call", "teardown"):  # xdist: the worker crashed while running it
        _PHASES.pop(report.nodeid, None)
        _write({"step": _STEP, "nodeid": report.nodeid, "outcome": "failed", "seconds": 0.0,
                "message": "worker crashed: " + _message(report)})
        return
    st = _PHASES.setdefault(report.nodeid, {"outcome": None, "seconds": 0.0, "message": ""})
    st["seconds"] += getattr(report, "duration", 0.0) or 0.0
    if report.failed:
        if st["outcome"] != "failed":
            st["outcome"] = "failed" if report.when == "call" else "error"
            st["message"] = _message(report)
    elif report.skipped and st["outcome"] is None:
        st["outcome"], st["message"] = "skipped", _message(report)
    elif report.when == "call" and st["outcome"] is None:
        st["outcome"] = "passed"
    if report.when == "teardown":  # always the last report of a test that ran to its end
        _write({"step": _STEP, "nodeid": report.nodeid, "outcome": st["outcome"] or "error",
                "seconds": round(st["seconds"], 3), "message": st["message"]})
        _PHASES.pop(report.nodeid, None)


def pytest_collectreport(report):
    if _OUT is not None and report.failed:
        _write({"step": _STEP, "nodeid": report.nodeid, "outcome": "error", "seconds": 0.0,
                "message": "collection failed: " + _message(report)})


def pytest_sessionfinish(session, exitstatus):
    if _OUT is not None:
        _write({"step": _STEP, "session_exit": int(exitstatus), "collected": session.testscollected})
        _OUT.flush()
