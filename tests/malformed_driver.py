"""Run many entry-script invocations in ONE Python process (interpreter and library start-up cost seconds).

    python tests/malformed_driver.py CASES.json RESULTS.json

``CASES.json`` is a list of ``{"id": ..., "script": path, "argv": [...], "cwd": dir (optional)}``. Every case runs
its script with ``runpy.run_path(script, run_name="__main__")`` and ``sys.argv = [script, *argv]``, with file
descriptors 1 and 2 redirected to temporary files, so whatever reaches stdout/stderr (print, logging handlers,
warnings, C-level writes) is captured. ``RESULTS.json`` maps each id to ``{"code", "stderr", "stdout", "elapsed",
"uncaught"}``: ``code`` is the exit status the script would have had as its own process (``SystemExit``'s code; 1 for
an exception that escaped, whose traceback is then appended to ``stderr`` as Python itself would print it).

Used by tests/test_malformed_inputs.py; not a test module itself.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fresh_warning_state() -> None:
    """Make warnings and transformers' once-only log messages behave as in a new process: a case must not pass
    only because an earlier case already printed (and so suppressed) the same warning."""
    warnings.onceregistry.clear()
    mutated = getattr(warnings, "_filters_mutated", None)  # invalidates every module's __warningregistry__
    if mutated is not None:
        mutated()
    for module in list(sys.modules.values()):
        registry = getattr(module, "__warningregistry__", None)
        if isinstance(registry, dict):
            registry.clear()
    for name in ("warning_once", "info_once", "warning_advice"):
        clear = getattr(getattr(logging.Logger, name, None), "cache_clear", None)
        if clear is not None:
            clear()


def _exit_code(exc: SystemExit, err) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=err)  # what the interpreter prints for sys.exit("message")
    return 1


def run_case(case: dict) -> dict:
    script = os.path.abspath(case["script"])
    saved_argv, saved_cwd, saved_path = list(sys.argv), os.getcwd(), list(sys.path)
    _fresh_warning_state()
    with tempfile.TemporaryFile("w+b") as err_file, tempfile.TemporaryFile("w+b") as out_file:
        sys.stdout.flush()
        sys.stderr.flush()
        saved_out, saved_err = os.dup(1), os.dup(2)
        os.dup2(out_file.fileno(), 1)
        os.dup2(err_file.fileno(), 2)
        uncaught = None
        start = time.perf_counter()
        try:
            if case.get("cwd"):
                os.chdir(case["cwd"])
            sys.argv = [script, *case["argv"]]
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc, sys.stderr)
        except BaseException:  # noqa: BLE001 - anything that escapes the script is what the test looks for
            uncaught = traceback.format_exc()
            sys.stderr.write(uncaught)
            code = 1
        finally:
            elapsed = time.perf_counter() - start
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            sys.argv, sys.path[:] = saved_argv, saved_path
            os.chdir(saved_cwd)
        err_file.seek(0)
        out_file.seek(0)
        stderr = err_file.read().decode("utf-8", "replace")
        stdout = out_file.read().decode("utf-8", "replace")
    return {
        "code": code,
        "stderr": stderr,
        "stdout": stdout,
        "elapsed": elapsed,
        "uncaught": ("uncaught: " + uncaught) if uncaught else None,
    }


def main(argv: list[str]) -> int:
    cases_path, results_path = argv
    with open(cases_path, encoding="utf-8") as handle:
        cases = json.load(handle)
    results = {}
    for case in cases:
        results[case["id"]] = run_case(case)
        print(
            f"{case['id']}: exit {results[case['id']]['code']} in {results[case['id']]['elapsed']:.2f}s",
            file=sys.stderr,
            flush=True,
        )
        with open(results_path, "w", encoding="utf-8") as handle:  # after every case: a hang keeps what ran
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
