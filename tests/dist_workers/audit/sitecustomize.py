"""Record which process writes under a directory (tests/test_distributed_training.py).

Put this folder on PYTHONPATH and set PIMA_AUDIT_DIR (where to report) and PIMA_AUDIT_ROOT (the
directory to watch): every Python process started then, launcher agents and ranks alike, imports
this file at start-up, and a PEP 578 audit hook notes each file opened for writing, renamed,
removed or created under the watched directory. At exit the process writes
PIMA_AUDIT_DIR/writes-<pid>.json with its rank (RANK or PMI_RANK, else null) and the list. That
lets the test check that rank 0 alone writes a run's outputs, with the real `python -m pima_hpc`
command line, unmodified. Without the two variables this file does nothing.
"""

import os
import sys

_report_dir = os.environ.get("PIMA_AUDIT_DIR")
_root = os.environ.get("PIMA_AUDIT_ROOT")

if _report_dir and _root:
    import atexit
    import json

    _root = os.path.abspath(_root)
    _writes = []
    _busy = [False]
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if _busy[0] or event not in ("open", "os.rename", "os.remove", "os.mkdir", "os.rmdir"):
            return
        _busy[0] = True
        try:
            paths = args[:2] if event == "os.rename" else args[:1]  # a rename writes its destination
            if event == "open":
                mode, flags = args[1], args[2]
                writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
            else:
                writing = True
            for path in paths if writing else ():
                if isinstance(path, (str, bytes, os.PathLike)):
                    full = os.path.abspath(os.fsdecode(path))
                    if full == _root or full.startswith(_root + os.sep):
                        _writes.append([event, os.path.relpath(full, _root)])
        finally:
            _busy[0] = False

    def _report():
        _busy[0] = True
        rank = os.environ.get("RANK", os.environ.get("PMI_RANK"))
        with open(os.path.join(_report_dir, f"writes-{os.getpid()}.json"), "w") as fh:
            json.dump({"rank": None if rank is None else int(rank), "argv": sys.argv, "writes": _writes}, fh)

    sys.addaudithook(_hook)
    atexit.register(_report)
