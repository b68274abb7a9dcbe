"""Report tables from per-sample results (no study needed)."""
import numpy as np
import pandas as pd

from dad3dlib import report


def per_sample(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 3, n)
    rows = []
    for abl, shift in (("baseline", 0.0), ("alias", 0.0), ("worse", 0.5)):
        for i in range(n):
            rows.append({"ablation": abl, "item_id": f"i{i}", "seed": 1, "mean_mm": base[i] + shift,
                         "z5_accuracy": 0.9 - shift / 10})
    return pd.DataFrame(rows)


def test_paired_deltas_and_their_table():
    deltas = report.paired_deltas(per_sample())
    worse = deltas[(deltas.ablation == "worse") & (deltas.metric == "mean_mm")].iloc[0]
    assert abs(worse.delta - 0.5) < 1e-12
    assert worse.p_value < 1e-6 and worse.n == 40
    table = report.format_deltas(deltas)
    assert list(table.index) == ["alias", "worse"]
    assert list(table.columns) == ["Mean (mm)", "Z₅ accuracy (reference pairing)"]
    assert table.loc["alias", "Mean (mm)"] == "identical"
    assert table.loc["worse", "Mean (mm)"].startswith("+0.50 (p=")
    assert table.loc["worse", "Z₅ accuracy (reference pairing)"].startswith("-0.050 (p=")
    assert report.format_deltas(pd.DataFrame()).empty
