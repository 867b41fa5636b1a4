"""rexmol.allocator: freed blocks of a few MiB stay in the process instead of being faulted in again."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Eight 4 MiB arrays allocated, touched and freed, 50 times: the minor page faults of the last 50 rounds.
PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from rexmol.allocator import tune_allocator
    assert tune_allocator()
def cycle():
    arrays = [np.ones(1 << 19) for _ in range(8)]
    del arrays
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_tuned_allocator_keeps_freed_pages_where_the_default_faults_them_in_again():
    from rexmol.allocator import tune_allocator

    if sys.platform != "linux":
        pytest.skip("glibc malloc only")
    env_before = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("MALLOC_")]:
            del os.environ[key]
        if not tune_allocator():
            pytest.skip("no glibc mallopt here")
        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30)  # children inherit the policy
        assert not tune_allocator()  # a MALLOC_* variable is set now: left as it is
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    plain, tuned = _faults("plain"), _faults("tuned")
    assert tuned < 2_000 < 20_000 < plain  # 8 x 4 MiB x 50 rounds = 409,600 pages if every one faulted
