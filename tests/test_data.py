from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from disback.data import MIN_ROWS, load_data, read_point_file
from disback.data.toy import TOY
from disback.errors import DisbackError


@pytest.mark.parametrize("name", sorted(TOY))
def test_builtin_data_sets(name):
    cfg = tiny_config(data={"name": name})
    data = load_data(cfg.data, 0)
    assert data.train.shape == (cfg.data.n_train, 2) and data.reference.shape == (cfg.data.n_eval, 2)
    z = data.to_model(data.train)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.pow(2).mean()) - 1.0) < 0.05  # standardised
    np.testing.assert_allclose(data.from_model(z), data.train, atol=1e-5)


def test_ring_modes_are_where_the_points_are():
    data = load_data(tiny_config(data={"name": "ring8"}).data, 0)
    assert len(data.modes) == 8
    assert np.allclose(np.linalg.norm(data.modes, axis=1), 2.0)
    dist = np.linalg.norm(data.train[:, None] - data.modes[None], axis=2).min(1)
    assert (dist < 0.3).mean() > 0.99


def test_user_points_from_npy_and_csv_with_header(tmp_path):
    pts = np.random.default_rng(0).normal(size=(200, 2)) * 100 + 1000  # far from unit scale on purpose
    np.save(tmp_path / "p.npy", pts)
    (tmp_path / "p.csv").write_text("x,y\n" + "\n".join(f"{a},{b}" for a, b in pts))
    for file in ("p.npy", "p.csv"):
        data = load_data(tiny_config(data={"name": str(tmp_path / file)}).data, 0)
        np.testing.assert_allclose(data.train, pts)
        assert abs(float(data.to_model(data.train).std()) - 1.0) < 0.05


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros(300), "1-D array"),
        (np.zeros((30, 2, 2)), "shape"),
        (np.random.default_rng(0).normal(size=(MIN_ROWS - 1, 2)), "at least"),
        (np.where(np.arange(600).reshape(300, 2) == 7, np.nan, 1.0), "NaN"),
        (np.array([["a", "b"]] * 100), "numbers"),
    ],
)
def test_bad_point_files_give_clear_errors(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DisbackError, match=message):
        read_point_file(tmp_path / "bad.npy")


def test_bad_csv_and_unknown_names(tmp_path):
    (tmp_path / "bad.csv").write_text("1,2\n3,x\n")
    with pytest.raises(DisbackError, match="row 2 is not numeric"):
        read_point_file(tmp_path / "bad.csv")
    with pytest.raises(DisbackError, match="did you mean 'ring8'"):
        load_data(tiny_config(data={"name": "rign8"}).data, 0)
    with pytest.raises(DisbackError, match="does not exist"):
        load_data(tiny_config(data={"name": str(tmp_path / "none.npy")}).data, 0)
