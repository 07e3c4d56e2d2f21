"""The batching sweep's repository variants (loadtests.batching)."""
from __future__ import annotations

import pytest

from loadtests import batching
from model_repository import spec
from model_repository.render import CONFIG, read_config

pytestmark = pytest.mark.unit


def test_variant_changes_only_the_encoder_delay(ci_repository, tmp_path):
    out = batching.with_encoder_delay(ci_repository, tmp_path / "repo", 1234)
    changed = read_config(out / spec.QUERY_ENCODER / CONFIG)
    original = read_config(ci_repository / spec.QUERY_ENCODER / CONFIG)
    assert changed.dynamic_batching.max_queue_delay_microseconds == 1234
    assert original.dynamic_batching.max_queue_delay_microseconds != 1234, "the original was rewritten"
    changed.dynamic_batching.max_queue_delay_microseconds = original.dynamic_batching.max_queue_delay_microseconds
    assert changed == original
    assert read_config(out / spec.RANKER / CONFIG) == read_config(ci_repository / spec.RANKER / CONFIG)


def test_cli_refuses_bad_settings(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        batching.main(["--delays", "a,b"])
    assert e.value.code == 2 and "comma-separated" in capsys.readouterr().err
    assert batching.main(["--repository", str(tmp_path)]) == 2
    assert "no rendered repository" in capsys.readouterr().err
