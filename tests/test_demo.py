"""The library demo (`make demo-robust`) runs and prints a sane table."""

from __future__ import annotations

import re

from arcsim import demo


def test_demo_table_has_every_pipeline_and_attack(capsys):
    # Prepare / Execute
    demo.main(["--seeds", "1", "--dim", "50", "--num-honest", "5", "--f", "1"])
    out = capsys.readouterr().out
    # Assert: one row per pipeline, one column per attack, finite non-negative numbers
    for spec in demo.PIPELINES:
        assert re.search(rf"^{re.escape(spec)}\s+[0-9]", out, re.MULTILINE), spec
    for attack in demo.DEMO_ATTACKS:
        assert attack in out
    numbers = [float(v) for v in re.findall(r"\s(\d+\.\d{4})", out)]
    assert numbers and all(v >= 0 for v in numbers)


def test_nnm_cwtm_beats_the_plain_mean_against_sign_flip():
    # With 5 honest rows and 1 sign-flipping row, the robust pipeline's error is below the mean's.
    text = demo.table(num_honest=5, f=1, dim=50, heterogeneity=1.0, seeds=2)
    rows = {line.split("  ")[0].strip(): re.findall(r"\d+\.\d{4}", line) for line in text.splitlines()}
    column = demo.DEMO_ATTACKS.index("sign_flip")
    assert float(rows["arc > nnm > cwtm"][column]) < float(rows["mean"][column])
