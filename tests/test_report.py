"""Report: published table, Markdown, JSON, plots (rexmol.report)."""
import json

import numpy as np
import pytest

from rexmol.report import (DEFAULT_PUBLISHED, load_published, markdown_table, plot_energy_histograms,
                           plot_log_weights, plot_ramachandran, plot_roundtrip, write_json)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_shipped_published_table_has_the_papers_rows():
    table = load_published(DEFAULT_PUBLISHED)
    rows = {(r["model"], r.get("solver", "")): r for r in table["rows"]}
    assert len(rows) == 6
    assert rows[("DiT", "Rex (Dopri5)")]["e_w2"] == 0.495
    assert rows[("DiT", "Dopri5")]["ess"] == 0.140
    assert "ess" not in rows[("SBG (SMC)", "")]


def test_markdown_table_shows_ours_and_published_labelled():
    runs = [{"model": "DiT", "solver": "rex-dopri5", "n": 64, "ess": 0.0123, "e_w2": 1.5, "t_w2": 0.61,
             "e_w2_proposal": 80.0, "t_w2_proposal": 0.7, "nfe": 130.0, "s_per_sample": 2.5,
             "n_nonfinite": 1, "n_mirrored": 2}]
    text = markdown_table(runs, load_published())
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + 1 + 6
    assert "| DiT | rex-dopri5 | 1.500 | 0.610 | 0.0123 | 80.000 | 0.700 | 130.0 | 2.500 | 64 | 1 | 2 | this run |" in text
    published = [ln for ln in lines if "**published**" in ln]
    assert len(published) == 6 and any("0.495" in ln and "Rex (Dopri5)" in ln for ln in published)
    assert "comparable in kind" in text


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
    plot_ramachandran(tmp_path / "rama.png", [("MD", phi, psi, None), ("reweighted", phi, psi, w)])
    plot_energy_histograms(tmp_path / "energy.png", e_md, [("proposal", e_gen, None), ("reweighted", e_gen, w)])
    plot_log_weights(tmp_path / "logw.png", [("rex", np.append(rng.normal(size=99), np.nan))])
    plot_roundtrip(tmp_path / "rt.png", [("rex", 10 ** rng.uniform(-15, -12, 50)), ("dopri5", np.full(5, np.nan))])
    for name in ("rama", "energy", "logw", "rt"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
