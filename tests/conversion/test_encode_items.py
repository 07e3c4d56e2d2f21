"""Item encoding on Ray Data (conversion/encode_items.py): a real local Ray run on the CI catalog
with 2 actors gives exactly the served encoder's embeddings, resumes shard by shard, and refuses
bad input and outputs that do not match their input."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from conversion import encode_items as ei
from model_repository.runtime import ENCODER_FILE, TOKENIZER_FILE, BucketTokenizer, encode_texts, ort_session

MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def encoder_dir(ci_models) -> Path:
    return ci_models["encoder"]


@pytest.fixture(scope="module")
def shards(ci_models) -> Path:
    """The CI catalog as 4 Parquet shards (3000 titles)."""
    return ei.export_catalog_shards("ci", n_shards=4)


@pytest.fixture(scope="module")
def ray_local(encoder_dir):
    """One local Ray for the module: every encode_items call below reuses it."""
    with ei.ray_runtime(ei.EncodeSettings(input="", output=Path("."), encoder_dir=encoder_dir, actors=2)):
        yield


def _settings(input, output, encoder_dir, **kw) -> ei.EncodeSettings:
    return ei.EncodeSettings(input=str(input), output=Path(output), encoder_dir=encoder_dir, actors=2,
                             progress=False, **kw)


@pytest.fixture(scope="module")
def first_run(ray_local, shards, encoder_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("embeddings")
    # Small blocks: 3000 titles in several blocks, so both actors take some.
    return ei.encode_items(_settings(shards, out, encoder_dir, rows_per_block=256))


def _read_output(folder: Path) -> dict[int, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.parquet")):
        t = pq.read_table(f)
        emb = t.column(ei.EMBEDDING).combine_chunks()
        values = emb.values.to_numpy().reshape(len(t), emb.type.list_size)
        out.update(zip(t.column(ei.ID).to_pylist(), values))
    return out


def _input_titles(folder: Path) -> dict[int, str]:
    t = pa.concat_tables(pq.read_table(f) for f in sorted(folder.glob("*.parquet")))
    return dict(zip(t.column(ei.ID).to_pylist(), t.column(ei.TITLE).to_pylist()))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _copy_output(first_run, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(first_run.output, out)
    return out


# ---- the Ray run ----------------------------------------------------------------------------------

@pytest.mark.unit
def test_ray_run_encodes_every_shard_with_matching_ids(first_run, shards, encoder_dir):
    inputs = ei.list_shards(shards)
    assert sorted(first_run.encoded) == [f"{s.stem}.parquet" for s in inputs] and not first_run.skipped
    assert first_run.total_rows == 3000
    for shard in inputs:
        got = ei.read_ids(ei.output_shard(first_run.output, shard))
        assert sorted(got.tolist()) == sorted(ei.read_ids(shard).tolist()), shard.name
    schema = pq.read_schema(next(first_run.output.glob("*.parquet")))
    assert schema.field(ei.ID).type == pa.int64()
    assert schema.field(ei.EMBEDDING).type == pa.list_(pa.float32(), ei.encoder_dim(encoder_dir))
    assert not list(first_run.output.glob(".*")), "no temporary shard is left behind"


@pytest.mark.unit
def test_embeddings_equal_the_served_encoder_in_process(first_run, shards, encoder_dir):
    titles = _input_titles(shards)
    got = _read_output(first_run.output)
    ids = sorted(titles)
    session = ort_session(encoder_dir / ENCODER_FILE, threads=1)
    want = encode_texts(BucketTokenizer(encoder_dir / TOKENIZER_FILE), session, [titles[i] for i in ids])
    cos = _cosine(np.stack([got[i] for i in ids]), want)
    assert cos.min() >= MIN_COSINE, f"min cosine {cos.min():.6f}"


@pytest.mark.server
def test_embeddings_equal_the_served_text_embed(first_run, shards, search_client):
    titles = _input_titles(shards)
    got = _read_output(first_run.output)
    ids = sorted(titles)[::300]  # 10 titles across the catalog
    served = np.stack([search_client.embed(titles[i]) for i in ids])
    cos = _cosine(np.stack([got[i] for i in ids]), served)
    assert cos.min() >= MIN_COSINE, f"min cosine {cos.min():.6f}"


# ---- resume -------------------------------------------------------------------------------------

@pytest.mark.unit
def test_rerun_skips_finished_shards(first_run, shards, encoder_dir, tmp_path):
    out = _copy_output(first_run, tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = ei.encode_items(_settings(shards, out, encoder_dir))
    assert again.encoded == [] and sorted(again.skipped) == sorted(mtimes)
    assert again.ray_start_s == 0 and again.total_rows == 3000
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == mtimes


@pytest.mark.unit
def test_deleted_shard_is_redone_and_temporaries_never_count(ray_local, first_run, shards, encoder_dir, tmp_path):
    out = _copy_output(first_run, tmp_path)
    deleted = out / "items-00001.parquet"
    deleted.unlink()
    # An interrupted run's half-written file, for the deleted shard and for a finished one.
    (out / f".items-00001.parquet{ei.TMP_MARK}999").write_bytes(b"PAR1 half a row group")
    (out / f".items-00002.parquet{ei.TMP_MARK}999").write_bytes(b"PAR1")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = ei.encode_items(_settings(shards, out, encoder_dir))
    assert again.encoded == [deleted.name] and len(again.skipped) == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p != deleted} == kept
    assert not list(out.glob(".*")), "stale temporaries are removed"
    assert again.rows[deleted.name] == 750 and again.total_rows == 3000
    got, titles = _read_output(out), _input_titles(shards)
    assert sorted(got) == sorted(titles)


@pytest.mark.unit
def test_committed_shard_with_wrong_rows_is_detected(first_run, shards, encoder_dir, tmp_path):
    out = _copy_output(first_run, tmp_path)
    victim = out / "items-00003.parquet"
    pq.write_table(pq.read_table(victim).slice(0, 700), victim)
    with pytest.raises(ei.EncodeVerificationError, match="items-00003.parquet: 700 rows"):
        ei.encode_items(_settings(shards, out, encoder_dir))


@pytest.mark.unit
def test_committed_shard_with_other_ids_is_detected(first_run, shards, encoder_dir, tmp_path):
    out = _copy_output(first_run, tmp_path)
    victim = out / "items-00000.parquet"
    t = pq.read_table(victim)
    pq.write_table(t.set_column(0, ei.ID, pa.array(np.arange(len(t)), pa.int64())), victim)
    with pytest.raises(ei.EncodeVerificationError, match="item ids differ"):
        ei.verify_output(ei.list_shards(shards), out)


@pytest.mark.unit
def test_csv_shards_and_an_empty_shard(ray_local, shards, encoder_dir, tmp_path):
    titles = _input_titles(shards)
    ids = sorted(titles)[:300]
    inp = tmp_path / "csv"
    inp.mkdir()
    # A title that looks like a number must stay a string; an empty shard still gets its output.
    rows = [(i, titles[i]) for i in ids] + [(99_999_999, "1984")]
    for k, part in enumerate((rows[:150], rows[150:], [])):
        pacsv.write_csv(pa.table({ei.ID: pa.array([r[0] for r in part], pa.int64()),
                                  ei.TITLE: pa.array([r[1] for r in part], pa.string())}), inp / f"part-{k}.csv")
    result = ei.encode_items(_settings(inp, tmp_path / "out", encoder_dir, rows_per_block=64))
    assert result.rows == {"part-0.parquet": 150, "part-1.parquet": 151, "part-2.parquet": 0}
    got = _read_output(tmp_path / "out")
    session = ort_session(encoder_dir / ENCODER_FILE, threads=1)
    want = encode_texts(BucketTokenizer(encoder_dir / TOKENIZER_FILE), session, [titles[i] for i in ids] + ["1984"])
    assert _cosine(np.stack([got[i] for i in ids + [99_999_999]]), want).min() >= MIN_COSINE


# ---- bad input ----------------------------------------------------------------------------------

def _cli_error(capsys, argv) -> str:
    assert ei.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.unit
def test_cli_rejects_bad_input_with_one_line(capsys, encoder_dir, tmp_path):
    common = ["--encoder-dir", str(encoder_dir), "--output", str(tmp_path / "out"), "--no-progress"]
    assert "does not exist" in _cli_error(capsys, ["--input", str(tmp_path / "nope"), *common])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a shard")
    assert "no .parquet or .csv shards" in _cli_error(capsys, ["--input", str(tmp_path / "empty"), *common])
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({ei.ID: pa.array([1, 2], pa.int64()), "name": ["a", "b"]}), tmp_path / "bad" / "x.parquet")
    assert "lacks column(s) title" in _cli_error(capsys, ["--input", str(tmp_path / "bad"), *common])
    assert "lacks encoder.onnx" in _cli_error(capsys, ["--input", str(tmp_path / "bad"), "--encoder-dir",
                                                       str(tmp_path), "--output", str(tmp_path / "out")])
    assert "must be >= 1" in _cli_error(capsys, ["--input", str(tmp_path / "bad"), *common, "--actors", "0"])


@pytest.mark.unit
def test_cluster_address_comes_from_the_flag_or_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ei._in_ray_cluster(None)
    assert ei._in_ray_cluster("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert ei._in_ray_cluster(None)


# ---- from embedding shards to a served catalog artifact -----------------------------------------

@pytest.mark.unit
def test_embedding_shards_assemble_into_the_artifact_make_models_serves(first_run, ci_models, tmp_path):
    """`make catalog`'s output, assembled (conversion.catalog_artifact --embeddings), is the stage-05
    artifact: the same ids and features, embeddings equal to the in-process encoding, and a
    catalog the served ranker can swap in."""
    from conversion.build_models import profile_settings
    from conversion.catalog_artifact import artifact_from_embedding_shards
    from conversion.catalog_generator import Catalog, build_catalog
    from model_repository.catalog_store import check_catalog
    from model_repository.runtime import CatalogTables

    catalog = Catalog.load(build_catalog(profile_settings("ci").artifact.catalog))
    out = artifact_from_embedding_shards(first_run.output, catalog, tmp_path / "from-ray", progress=False)
    got, want = CatalogTables.load(out), CatalogTables.load(ci_models["catalog_artifact"])
    np.testing.assert_array_equal(got.item_ids, want.item_ids)
    np.testing.assert_array_equal(got.item_features, want.item_features)
    np.testing.assert_array_equal(got.user_features, want.user_features)
    assert not np.asarray(got.item_embeddings[0]).any()
    assert _cosine(np.asarray(got.item_embeddings[1:]), np.asarray(want.item_embeddings[1:])).min() >= MIN_COSINE
    check_catalog(out, want.embedding_dim)
    np.testing.assert_array_equal(got.item_rows(want.item_ids[:100]), np.arange(1, 101))


@pytest.mark.unit
def test_assembling_refuses_duplicate_ids_and_empty_folders(first_run, tmp_path):
    from conversion.catalog_artifact import main

    assert main(["--embeddings", str(tmp_path), "--out", str(tmp_path / "x"), "--profile", "ci"]) == 2
    dup = tmp_path / "dup"
    dup.mkdir()
    first = sorted(first_run.output.glob("*.parquet"))[0]
    shutil.copy(first, dup / "a.parquet")
    shutil.copy(first, dup / "b.parquet")
    assert main(["--embeddings", str(dup), "--out", str(tmp_path / "y"), "--profile", "ci"]) == 2
    assert not (tmp_path / "y").exists()
