"""Compare two runs' metrics.json, ignoring wall-clock fields: the check that a refactor changed nothing.

    python tools/compare_metrics.py RUN_A/metrics.json RUN_B/metrics.json

Prints IDENTICAL (exit 0) or the first differing keys (exit 1). Timing keys (any key with
``seconds``, ``*_s``, ``samples_per_s``) differ between any two runs and are left out.
"""

from __future__ import annotations

import json
import sys

TIMING = {"seconds", "samples_per_s", "timings", "written"}


def without_timings(x):
    if isinstance(x, dict):
        return {k: without_timings(v) for k, v in x.items()
                if k not in TIMING and "seconds" not in k and not k.endswith("_s")}
    if isinstance(x, list):
        return [without_timings(v) for v in x]
    return x


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'the second' if k not in a else 'the first'}")
            else:
                out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {str(a)[:60]} != {str(b)[:60]}"]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    a, b = (without_timings(json.loads(open(p).read())) for p in argv)
    found = differences(a, b)
    print("IDENTICAL" if not found else "\n".join(found[:30]))
    return 0 if not found else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
