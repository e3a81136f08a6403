"""Resident memory of API-key verification on many threads: why `up` grew by hundreds of
MiB, and that the fix holds.

Each API request whose key is not yet verified (a new key, a wrong secret, an unknown key
id) costs one scrypt hash (N=2^14, r=8: a 16 MiB buffer) on one of the API's 40 worker
threads. glibc raises its mmap threshold after the first such buffer is freed, so later
ones come from per-thread malloc arenas and stay resident. `beliefstore.access.keys`
fixes the threshold (``mallopt``) before its first hash.

Two fresh interpreters each hash ``--hashes`` times on 40 threads: one with
``hashlib.scrypt`` as is (the behaviour before the fix), one through
``beliefstore.access.keys._derive`` (with the fix). Reported: RSS before and after, and
the growth of the fixed run as a ratio to the unfixed one. Run:
`.venv/bin/python bench/auth_memory.py`; writes `bench/results/auth_memory-<date>.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, machine_info  # noqa: E402

PROBE = """
import hashlib, json, sys, psutil
from concurrent.futures import ThreadPoolExecutor
fixed = sys.argv[1] == "fixed"
count = int(sys.argv[2])
if fixed:
    from beliefstore.access.keys import _derive, _kdf_name
    derive = lambda i: _derive(f"secret{i}", b"s" * 16, _kdf_name())
else:
    derive = lambda i: hashlib.scrypt(f"secret{i}".encode(), salt=b"s" * 16, n=2**14, r=8,
                                      p=1, dklen=32)
proc = psutil.Process()
before = proc.memory_info().rss
with ThreadPoolExecutor(40) as pool:
    list(pool.map(derive, range(count)))
print(json.dumps({"rss_before_mib": before / 2**20, "rss_after_mib": proc.memory_info().rss / 2**20}))
"""


def probe(variant: str, hashes: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, variant, str(hashes)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hashes", type=int, default=600)
    args = parser.parse_args()
    started = datetime.now(UTC)
    unfixed, fixed = probe("unfixed", args.hashes), probe("fixed", args.hashes)
    growth = {name: round(r["rss_after_mib"] - r["rss_before_mib"], 1)
              for name, r in (("unfixed", unfixed), ("fixed", fixed))}
    result = {"benchmark": "auth_memory", "started": started.isoformat(timespec="seconds"),
              "machine": machine_info(), "params": {"hashes": args.hashes, "threads": 40},
              "unfixed": unfixed, "fixed": fixed, "growth_mib": growth,
              "fixed_growth_ratio_to_unfixed": round(growth["fixed"] / growth["unfixed"], 3)
              if growth["unfixed"] else None}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"auth_memory-{started.date().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
