"""The converter benchmark at ZAYA1-8B widths (slow: ~2 GB of disk, a minute or two)."""

import importlib.util
import os

import pytest

_BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "convert_bench.py")


@pytest.mark.slow
def test_convert_peak_rss_within_target(tmp_path):
    spec = importlib.util.spec_from_file_location("convert_bench", _BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.bench(layers=1, repeats=1, workdir=str(tmp_path))
    print(result)
    assert result["convert"]["peak_rss_bytes_max"] <= result["target_peak_rss_bytes"]
