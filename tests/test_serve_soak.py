"""experiments/soak/serve_soak.py against a real server: 2000 mixed good and bad requests."""
from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli


@pytest.mark.slow
def test_two_thousand_mixed_requests_answer_every_good_one_and_keep_memory_bounded(lively_run, tmp_path):
    report_path = tmp_path / "soak.json"
    result = run_cli([str(REPO / "experiments" / "soak" / "serve_soak.py"), "--model", str(lively_run),
                      "--requests", "2000", "--json", str(report_path)], timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    print(result.stdout)  # the soak's one-line report, for -s runs
    report = json.loads(report_path.read_text())
    assert report["wrong_count"] == 0 and report["server_alive_at_end"]
    assert report["good"] > 800 and report["bad"] > 800 and len(report["bad_kinds"]) >= 15
    assert report["distinct_reference_replies"] > 5  # the replies tell the prompts apart
    assert report["health"]["requests_answered"] >= report["good"]
    # Bounded: no growth with the number of requests served beyond allocator noise.
    assert report["rss_last_tenth_mib"] < report["rss_first_tenth_mib"] + 100
