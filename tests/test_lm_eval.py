"""lm-evaluation-harness (model local-completions) against `zaya serve`: its accuracy and per-choice
log-likelihoods on bench/lm_eval_tasks' multiple-choice task equal the same scoring done directly with
`forward` (bench/lm_eval_check.py). Needs the `lm-eval` extra; slow (lm-eval's run of 160 requests)."""

import os
import sys

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import lm_eval_check  # noqa: E402
from serve_util import demo_server  # noqa: E402


@pytest.mark.slow
def test_lm_eval_through_the_server_equals_direct_scoring(tmp_path_factory):
    with demo_server(tmp_path_factory, "--slots", "8") as url:
        out = lm_eval_check.compare(url, batch_size=8)
    assert out["docs"] == 40 and out["choices"] == 160
    assert [len(s) for s in out["loglikelihoods"]["lm_eval"]] == [4] * 40
    assert out["lm_eval"] == out["direct"], out
    assert out["max_abs_loglikelihood_diff"] <= 1e-4, out["max_abs_loglikelihood_diff"]
