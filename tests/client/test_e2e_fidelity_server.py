"""End to end: the served `search_rank` against the FP32 pipeline in PyTorch, independent of every
served file (conversion/torch_reference.py: the HF checkpoint for query and titles, the catalog
stage's own records for features, the ranker stage's FP32 PyTorch weights).

Queries are the broad evaluation set's (text no stage built, tuned or calibrated on); candidates
are 100 items drawn from the catalog, users a mix of known and unknown ids.
"""
from __future__ import annotations

import numpy as np
import pytest

from conversion.broad_text import load_broad_texts
from conversion.catalog_generator import Catalog
from conversion.torch_reference import reference_top_k

pytestmark = pytest.mark.server

SETS = 30
CANDIDATES = 100
# The release target (`make bench`, default profile) is top-10 agreement >= 0.9 with the FP32
# pipeline. This floor is for the ci profile's build (smaller catalog, shorter distillation, the
# encoder its broad gate chose, the ranker its top-10 gate chose): 0.933 measured on 2026-12-02
# (min 0.8 over the 30 sets). A set's overlap varies by about 0.1, so the mean of 30 has a standard
# error near 0.02; the floor sits 4 of them below the measurement, and far above what a broken
# conversion gives (a random ranking of 100 overlaps by about 0.1; the pruned encoder that failed
# the broad gate, with the AUC-gated ranker, measured 0.78 against FP32 on the default profile).
AGREEMENT_FLOOR = 0.85


def test_served_top10_agrees_with_the_pytorch_fp32_pipeline(search_client, ci_models):
    catalog = Catalog.load(ci_models["catalog"])
    queries = load_broad_texts().queries
    rng = np.random.default_rng(11)
    overlaps = []
    for n in range(SETS):
        query = queries[(n * 7) % len(queries)]
        ids = rng.choice(catalog.item_ids, CANDIDATES, replace=False).astype(np.int64).tolist()
        user = int(catalog.user_ids[n]) if n % 3 else 10**12 + n  # an unknown user now and then
        served = [r.item_id for r in search_client.rank(query, user, ids, top_k=10)]
        expected = reference_top_k("ci", query, user, ids, k=10)
        assert len(served) == 10 and set(served) <= set(ids)
        overlaps.append(len(set(served) & set(expected)) / 10)
    mean = float(np.mean(overlaps))
    print(f"\nserved vs PyTorch FP32 pipeline, top-10 overlap over {SETS} sets of {CANDIDATES}: "
          f"mean {mean:.3f}, min {min(overlaps):.1f}")
    assert mean >= AGREEMENT_FLOOR, overlaps
