"""The converter benchmark at ZAYA1-8B widths (slow: ~2 GB of disk, a minute or two)."""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "convert_bench.py")


@pytest.mark.slow
def test_convert_peak_rss_within_target(tmp_path):
    out = subprocess.run([sys.executable, BENCH, "--layers", "1", "--repeats", "1", "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True).stdout
    result = json.loads(out.splitlines()[0])
    print(result)
    assert result["convert"]["peak_rss_bytes_max"] <= result["target_peak_rss_bytes"]
