"""Report: published table, Markdown, JSON, plots (rexmol.report)."""
import json

import numpy as np
import pytest

from rexmol.report import (basin_table, load_published, markdown_table, plot_cost, plot_energy_histograms,
                           plot_log_weights, plot_ramachandran, plot_roundtrip, published_table, write_json)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _table_lines_are_valid_markdown(text: str) -> int:
    """Every table block has as many cells in each row as in its header and delimiter; returns the row count."""
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    assert blocks
    for block in blocks:
        cells = [len(line.strip().strip("|").split("|")) for line in block]
        assert set(block[1].strip("|").split("|")) == {"---"}
        assert len(set(cells)) == 1, cells
    return sum(len(b) - 2 for b in blocks)


def test_shipped_published_table_is_package_data_and_cites_the_paper():
    source = published_table("ala3")
    assert source is not None and "rexmol" in str(source) and published_table("ala2") is None
    table = load_published(source)
    assert table["source"] == ("Blasingame and Liu, 'Rex: Algebraically reversible solvers for diffusion models', "
                               "ICML 2026, Table 6")
    rows = {(r["model"], r.get("solver", "")): r for r in table["rows"]}
    assert len(rows) == 6
    assert rows[("DiT", "Rex (Dopri5)")]["e_w2"] == 0.495
    assert rows[("DiT", "Dopri5")]["ess"] == 0.140
    assert "ess" not in rows[("SBG (SMC)", "")]


def test_markdown_table_shows_ours_floor_and_published_labelled_with_intervals():
    runs = [{"model": "DiT", "solver": "rex-dopri5", "n": 64, "ess": 0.0123, "e_w2": 1.5, "t_w2": 0.61,
             "e_w2_proposal": 80.0, "t_w2_proposal": 0.7, "nfe": 130.0, "s_per_sample": 2.5,
             "n_nonfinite": 1, "n_mirrored": 2, "n_distinct_resampled": 3, "protocol": "unclipped SNIS",
             "ci95": {"e_w2": [1.0, 2.0], "ess": [0.01, 0.05]}, "few_samples": True, "ess_abs": 0.79,
             "bootstrap": {"replicates": 100}}]
    floor = {"model": "MD floor", "solver": "64 evenly spaced train frames (equal weights)", "n": 64, "ess": 1.0,
             "e_w2": 0.9, "t_w2": 0.4, "protocol": "unclipped SNIS"}
    text = markdown_table(runs, load_published(), floor)
    assert _table_lines_are_valid_markdown(text) == 1 + 1 + 6
    assert ("| DiT | rex-dopri5 | unclipped SNIS | 1.500 [1.000, 2.000] | 0.610 | 0.0123 [0.0100, 0.0500] | 80.000 "
            "| 0.700 | 3 | 130.0 | 2.500 | 64 | 1 | 2 | this run ⚠ |") in text
    assert "| MD floor | 64 evenly spaced train frames (equal weights) |" in text
    published = [ln for ln in text.splitlines() if "**published**" in ln]
    assert len(published) == 6 and any("0.495" in ln and "Rex (Dopri5)" in ln for ln in published)
    assert all("top 0.2 % of log w dropped" in ln for ln in published)
    assert "comparable in kind" in text and "ICML 2026, Table 6" in text and "100 replicates" in text
    assert "Warning: few samples" in text and "ESS·N = 0.8" in text
    runs[0]["solver"] = "a | b"  # a pipe inside a cell must not split it
    _table_lines_are_valid_markdown(markdown_table(runs))


def test_basin_table_is_valid_markdown_with_intervals():
    pop = {"mean": 0.5, "stderr": 0.1, "ci95": [0.4, 0.6]}
    basins = {"phi2/psi2": {k: {"alpha_R": pop, "beta": pop, "alpha_L": pop} for k in ("md", "proposal", "reweighted")}}
    text = basin_table([{"label": "DiT rex", "basins": basins}])
    assert _table_lines_are_valid_markdown(text) == 3 and "0.500 [0.400, 0.600]" in text


def test_load_published_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_published(tmp_path / "nope.toml")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"model": "x"}]}))
    with pytest.raises(ValueError, match="lacks"):
        load_published(bad)


def test_write_json_handles_numpy_and_nonfinite(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"a": np.float32(1.5), "b": np.arange(3), "c": float("inf"), "d": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": "inf", "d": None}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left behind


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    phi, psi = rng.uniform(-np.pi, np.pi, (2, 300))
    e_md = rng.normal(-140, 5, 500)
    e_gen = np.append(rng.normal(-120, 20, 299), np.inf)
    w = rng.random(300)
    w[-1] = 0
    w /= w.sum()
    lw = np.append(rng.normal(size=99), np.nan)
    clipped = np.zeros(100, bool)
    clipped[np.argmax(np.nan_to_num(lw, nan=-9))] = True
    plot_ramachandran(tmp_path / "rama.png", [("MD", phi, psi, None), ("reweighted", phi, psi, w)])
    plot_energy_histograms(tmp_path / "energy.png", e_md, [("rex: N = 300", e_gen, w), ("tiny: N = 3", e_gen[:3], w[:3])])
    plot_log_weights(tmp_path / "logw.png", [("rex", lw, clipped), ("dopri5", lw, None)])
    plot_roundtrip(tmp_path / "rt.png", [("rex", 10 ** rng.uniform(-15, -12, 50)), ("dopri5", np.full(5, np.nan))])
    plot_cost(tmp_path / "cost.png", [{"label": "rex", "s_per_sample": 2.0, "cpu_s_per_sample": 1.5, "nfe": 222},
                                      {"label": "dopri5", "s_per_sample": 0.5, "cpu_s_per_sample": 0.4, "nfe": 53}])
    for name in ("rama", "energy", "logw", "rt", "cost"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_log_weight_histogram_counts_are_linear(tmp_path, monkeypatch):
    import matplotlib.axes

    scales = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yscale", lambda self, v, **k: scales.append(v))
    plot_log_weights(tmp_path / "logw.png", [("rex", np.arange(10.0), None)])
    assert scales == []
