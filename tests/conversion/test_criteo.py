"""The Criteo-style TSV loader and trainer, on small files the tests write themselves."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conversion.criteo import (N_CAT, N_DENSE, N_FIELDS, CriteoFormatError, CriteoTrainSettings, SplitRule,
                               iter_chunks, split_codes, train_criteo, transform_dense)
from conversion.ranker_model import hash_bucket
from conversion.stages import REPO_ROOT

pytestmark = pytest.mark.unit


def write_criteo(path: Path, n: int, seed: int = 0, missing_rate: float = 0.15) -> Path:
    """A Criteo-layout file with a learnable signal: I1 and C1/C2 drive the click probability."""
    rng = np.random.default_rng(seed)
    vocab = [[f"{v:08x}" for v in rng.integers(0, 2**32, 40)] for _ in range(N_CAT)]
    effect = rng.normal(0, 1.2, (N_CAT, 40))
    lines = []
    for _ in range(n):
        ints = rng.poisson(rng.uniform(0.5, 30, N_DENSE))
        ints[2] -= 2  # a column with negative values, as Criteo's I2 has
        cat_idx = rng.integers(0, 40, N_CAT)
        logit = -1.0 + 0.6 * (np.log1p(max(ints[0], 0)) - 2.0) + effect[0, cat_idx[0]] + effect[1, cat_idx[1]]
        label = int(rng.random() < 1 / (1 + np.exp(-logit)))
        dense = ["" if rng.random() < missing_rate else str(v) for v in ints]
        cats = ["" if rng.random() < missing_rate else vocab[j][cat_idx[j]] for j in range(N_CAT)]
        lines.append("\t".join([str(label), *dense, *cats]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def small_tsv(tmp_path_factory) -> Path:
    return write_criteo(tmp_path_factory.mktemp("criteo") / "small.tsv", 600)


def test_parses_values_and_missing_fields(tmp_path):
    dense = ["5", "", "-2", "0", "", "100", "1", "2", "3", "4", "5", "6", ""]
    cats = ["", "68fd1e64", "ffffffffffffffff", *([""] * 23)]
    path = tmp_path / "one.tsv"
    path.write_text("\t".join(["1", *dense, *cats]) + "\n")
    (chunk,) = list(iter_chunks(path, hash_bits=10))
    assert chunk.line.tolist() == [1] and chunk.label.tolist() == [1.0]
    raw = np.array([float(x) if x else np.nan for x in dense])
    np.testing.assert_allclose(chunk.dense[0], np.nan_to_num(np.sign(raw) * np.log1p(np.abs(raw))), rtol=1e-6)
    assert chunk.dense[0, 1] == 0.0 and chunk.dense[0, 2] == pytest.approx(-np.log(3.0))
    # missing categoricals are the cold-start bucket 0; present ones the shared id hash
    assert chunk.cats[0, 0] == 0 and (chunk.cats[0, 3:] == 0).all()
    assert chunk.cats[0, 1] == hash_bucket(np.array([0x68FD1E64]), 10)[0]
    assert chunk.cats[0, 2] == hash_bucket(np.array([2**64 - 1], dtype=np.uint64), 10)[0]
    assert 1 <= chunk.cats[0, 1] <= 2**10


@pytest.mark.parametrize("bad, message", [
    ("\t".join(["1"] * 12), "expected 40 tab-separated fields"),
    ("\t".join(["2", *["1"] * N_DENSE, *["ab"] * N_CAT]), "label must be 0 or 1"),
    ("\t".join(["", *["1"] * N_DENSE, *["ab"] * N_CAT]), "label must be 0 or 1"),
    ("\t".join(["0", "1.5", *["1"] * (N_DENSE - 1), *["ab"] * N_CAT]), "integer feature I1"),
    ("\t".join(["0", *["1"] * N_DENSE, "xyz", *["ab"] * (N_CAT - 1)]), "categorical feature C1"),
    ("\t".join(["0", *["1"] * N_DENSE, *["ab"] * (N_CAT - 1), "1" * 17]), "categorical feature C26"),
])
def test_malformed_line_names_file_and_line_number(tmp_path, small_tsv, bad, message):
    lines = small_tsv.read_text().splitlines()
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines[:6] + [bad] + lines[6:20]) + "\n")
    with pytest.raises(CriteoFormatError, match=rf"bad\.tsv:7: .*{message}"):
        for _ in iter_chunks(path, chunk_rows=4):
            pass


def test_malformed_line_fails_whichever_split_is_read(tmp_path, small_tsv):
    lines = small_tsv.read_text().splitlines()
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines[:50] + ["0\t1"] + lines[50:]) + "\n")
    for split in ("train", "val", "test"):
        with pytest.raises(CriteoFormatError, match=r":51: "):
            list(iter_chunks(path, chunk_rows=16, split=split))


def test_streams_in_chunks_of_the_requested_size(small_tsv, monkeypatch):
    chunks = list(iter_chunks(small_tsv, chunk_rows=64))
    assert [len(c) for c in chunks] == [64] * 9 + [600 - 9 * 64]
    assert np.concatenate([c.line for c in chunks]).tolist() == list(range(1, 601))
    # a generator: nothing beyond the first chunk is parsed before it is asked for
    import conversion.criteo as criteo

    parsed = []
    real = criteo._parse_into
    monkeypatch.setattr(criteo, "_parse_into", lambda rows, line, n, p: (parsed.append(n), real(rows, line, n, p)))
    it = iter_chunks(small_tsv, chunk_rows=50)
    first = next(it)
    assert len(first) == 50 and len(parsed) == 50
    it.close()


def test_split_is_deterministic_disjoint_and_independent_of_chunking(small_tsv):
    rule = SplitRule(seed=3, val_fraction=0.2, test_fraction=0.2)
    per_split = {s: np.concatenate([c.line for c in iter_chunks(small_tsv, 64, split=s, rule=rule)])
                 for s in ("train", "val", "test")}
    again = {s: np.concatenate([c.line for c in iter_chunks(small_tsv, 7, split=s, rule=rule)])
             for s in ("train", "val", "test")}
    for s in per_split:
        np.testing.assert_array_equal(per_split[s], again[s])
    all_lines = np.sort(np.concatenate(list(per_split.values())))
    np.testing.assert_array_equal(all_lines, np.arange(1, 601))
    assert 0.12 < len(per_split["val"]) / 600 < 0.28 and 0.12 < len(per_split["test"]) / 600 < 0.28
    other_seed = split_codes(np.arange(1, 601), SplitRule(seed=4, val_fraction=0.2, test_fraction=0.2))
    assert (other_seed != split_codes(np.arange(1, 601), rule)).any()


def test_transform_dense_is_signed_log_and_zero_for_missing():
    np.testing.assert_allclose(transform_dense(np.array([[0.0, np.nan, 9.0, -1.0]])),
                               [[0.0, 0.0, np.log(10.0), -np.log(2.0)]], rtol=1e-6)


def test_tiny_training_run_learns_the_signal(tmp_path):
    path = write_criteo(tmp_path / "train.tsv", 6000, seed=1)
    settings = CriteoTrainSettings(hash_bits=8, epochs=4, batch_size=256, lr=5e-3, chunk_rows=1000,
                                   cross_ranks=(4,), deep=(16,))
    model, metrics = train_criteo(path, settings, progress=False)
    hist = [h["logloss"] for h in metrics["history"]]
    print(f"\ncriteo val logloss per epoch {hist}; test auc {metrics['test']['auc']:.3f}")
    assert min(hist) < hist[0] or metrics["val"]["logloss"] < 0.62
    assert metrics["test"]["auc"] > 0.65
    assert metrics["val"]["rows"] + metrics["test"]["rows"] + metrics["history"][0]["train_rows"] == 6000


def test_cli_trains_and_reports(tmp_path, small_tsv):
    out = tmp_path / "metrics.json"
    result = subprocess.run([sys.executable, "-m", "conversion.criteo", "--tsv", str(small_tsv), "--epochs", "1",
                             "--hash-bits", "6", "--chunk-rows", "128", "--out", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) == {"val", "test"} and printed["test"]["auc"] is not None
    assert json.loads(out.read_text())["settings"]["hash_bits"] == 6


def test_cli_reports_malformed_line(tmp_path):
    path = tmp_path / "broken.tsv"
    path.write_text("\t".join(["1", *[""] * N_DENSE, *[""] * N_CAT]) + "\n" + "1\t2\t3\n")
    result = subprocess.run([sys.executable, "-m", "conversion.criteo", "--tsv", str(path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "broken.tsv:2:" in result.stderr and f"expected {N_FIELDS}" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_and_missing_file(tmp_path):
    help_run = subprocess.run([sys.executable, "-m", "conversion.criteo", "--help"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "--tsv" in help_run.stdout
    missing = subprocess.run([sys.executable, "-m", "conversion.criteo", "--tsv", str(tmp_path / "nope.tsv")],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no such file" in missing.stderr
