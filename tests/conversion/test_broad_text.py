"""The broad evaluation set: loading, validation, provenance, and that the gate reads it."""
from __future__ import annotations

import pytest

from conversion import broad_text as bt
from conversion.encoder_report import BROAD, CATALOG, INT8, QDQ, main, targets

pytestmark = pytest.mark.unit

TITLES = [f"Title number {i}, cotton, size {i}" for i in range(bt.MIN_TITLES)]


def write(tmp_path, lines: list[str], name: str = "eval.txt", raw: bytes | None = None):
    path = tmp_path / name
    path.write_bytes(raw if raw is not None else ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def good_lines() -> list[str]:
    return ["query\tcotton t-shirt", "query\tsize 3 shirt"] + [f"title\t{t}" for t in TITLES]


def test_bundled_set_loads_with_its_provenance():
    texts = bt.load_broad_texts()
    assert (len(texts.queries), len(texts.titles)) == (165, 270)
    assert texts.provenance == bt.BROAD_PROVENANCE
    assert "written for evaluation only" in texts.summary()["provenance"]


def test_provenance_hash_is_stable_and_format_independent(tmp_path):
    bundled = bt.load_broad_texts()
    assert bundled.sha256 == bt.load_broad_texts().sha256
    # The same texts in the user format, with CRLF line ends, hash alike: the hash is of the texts.
    lines = [f"query\t{q}" for q in bundled.queries] + [f"title\t{t}" for t in bundled.titles]
    path = write(tmp_path, [], raw="\r\n".join(lines).encode("utf-8"))
    assert bt.load_eval_file(path).sha256 == bundled.sha256
    changed = write(tmp_path, good_lines(), "a.txt")
    assert bt.load_eval_file(changed).sha256 != bundled.sha256


def test_user_file_tells_queries_from_titles(tmp_path):
    texts = bt.load_eval_file(write(tmp_path, good_lines()))
    assert texts.queries == ("cotton t-shirt", "size 3 shirt")
    assert texts.titles == tuple(TITLES)
    assert texts.provenance == bt.USER_PROVENANCE


@pytest.mark.parametrize("lines,raw,message", [
    ([], b"", "empty file"),
    (None, b"query\tcaf\xe9\n", "not UTF-8"),
    (["cotton t-shirt"], None, "must start with 'query<TAB>' or 'title<TAB>'"),
    (["query\tshirt", "query\t  "], None, ":2: empty query"),
    (["query\tshirt", "query\tshirt"], None, ":2: duplicate query (first on line 1)"),
    ([f"title\t{t}" for t in TITLES], None, "no queries"),
    (["query\tshirt"] + [f"title\t{t}" for t in TITLES[:5]], None, "5 titles; at least 20"),
])
def test_bad_file_is_one_line_error_naming_it(tmp_path, lines, raw, message):
    path = write(tmp_path, lines or [], raw=raw)
    with pytest.raises(bt.EvalTextsError) as err:
        bt.load_eval_file(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(bt.EvalTextsError, match="cannot read"):
        bt.load_eval_file(tmp_path / "nope.txt")


def test_report_cli_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    path = write(tmp_path, ["cotton t-shirt"])
    assert main(["--profile", "ci", "--eval-texts", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(path) in err and "\n" not in err


def test_vocabulary_overlap_is_measured_against_the_generator():
    vocab = bt.catalog_vocabulary()
    assert {"waterproof", "backpack", "navy", "norra", "500"} <= vocab
    got = bt.vocabulary_overlap(["waterproof backpack", "sourdough starter kit"])
    assert got["word_types"] == 5 and got["shared_types"] == 2
    assert got["share_of_types"] == pytest.approx(0.4)
    assert got["texts_naming_a_catalog_category"] == ["waterproof backpack"]
    broad = bt.load_broad_texts().summary()["catalog_vocabulary_overlap"]
    assert broad["share_of_types"] < 0.25  # the point of the set: mostly words the generator never writes


def _fidelity(broad: float, catalog: float) -> dict:
    return {BROAD: {"mean_cosine": broad, "top10_overlap": broad},
            CATALOG: {"mean_cosine": catalog, "top10_overlap": catalog}}


def test_gate_judges_the_broad_set_not_the_catalog_split():
    speed = {"latency_1x16_ms": 1.0, "throughput_32x32": 100.0}
    rows = {"fp32": {**speed, "fidelity": _fidelity(1.0, 1.0)},
            INT8: {**speed, "fidelity": _fidelity(0.85, 0.995)},  # fine in-distribution, drifts outside it
            QDQ: {**speed, "fidelity": _fidelity(0.99, 0.5)}}
    got = targets(rows)
    assert not got["mean_cosine"]["pass"] and not got["top10_overlap"]["pass"]
    assert got["mean_cosine"]["value"] == 0.85 and got["mean_cosine"]["catalog_heldout"] == 0.995
    assert got["qdq_mean_cosine"]["pass"] and got["qdq_top10_overlap"]["pass"]
    assert got["qdq_top10_overlap"]["target"] == 0.9
