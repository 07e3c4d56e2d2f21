"""Seeded fuzz of search_rank on the real server: valid and malformed requests interleaved.

The generator decides whether each request is valid from the serving contract (model_repository
/spec.py and DESIGN.md: one non-blank UTF-8 QUERY of at most MAX_QUERY_BYTES, USER_ID >= 0,
1..MAX_CANDIDATES unique non-negative INT64 CANDIDATE_IDS, optional INT32 TOP_K >= 1, no other
tensors, declared dtypes and shapes), not from the server's code. A valid request must be answered
with a well-formed ranking of its own candidates; an invalid one with INVALID_ARGUMENT; the server
must stay up and ready throughout. CI runs FUZZ_REQUESTS of them; FUZZ_REQUESTS=5000 for a long run.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from model_repository import spec

pytestmark = pytest.mark.server

N_REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "600"))
GOOD_QUERIES = [b"shoes", b"red running shoes", "h\u00e9llo w\u00f6rld".encode(), b"\x00x", b"a" * spec.MAX_QUERY_BYTES,
                "\u9774 \U0001f45f".encode()]
BAD_QUERIES = [b"", b"   ", "\u3000\t".encode(), b"\xff\xfe", b"\xc3\x28", b"a" * (spec.MAX_QUERY_BYTES + 1)]


@dataclass
class Case:
    tensors: dict  # name -> (Triton dtype, array)
    valid: bool
    why: str


def _valid_text(raw: bytes) -> bool:
    if len(raw) > spec.MAX_QUERY_BYTES:
        return False
    try:
        return bool(raw.decode("utf-8").strip())
    except UnicodeDecodeError:
        return False


def random_case(rng: random.Random) -> Case:
    # each field is well-formed most of the time, so about a third of the requests are valid
    if rng.random() < 0.75:
        query = rng.choice(GOOD_QUERIES)
    else:
        query = rng.choice(BAD_QUERIES + [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 24)))])
    n = rng.choice([1, 2, 10, 100, spec.MAX_CANDIDATES]) if rng.random() < 0.85 else \
        rng.choice([0, spec.MAX_CANDIDATES + 1, 3000])
    user = rng.choice([0, 1, 7, 2 ** 62]) if rng.random() < 0.9 else -1
    tensors = {
        spec.QUERY.name: ("BYTES", np.array([query], dtype=np.object_)),
        spec.USER_ID.name: ("INT64", np.array([user], dtype=np.int64)),
        spec.CANDIDATE_IDS.name: ("INT64", np.array(rng.sample(range(0, 10 ** 7), n), dtype=np.int64)),
    }
    reasons = []
    if not _valid_text(query):
        reasons.append("query")
    if user < 0:
        reasons.append("negative user")
    if not 1 <= n <= spec.MAX_CANDIDATES:
        reasons.append(f"{n} candidates")
    if rng.random() < 0.4:
        k = rng.choice([-1, 0, 1, 5, 5000])
        tensors[spec.TOP_K.name] = ("INT32", np.array([k], dtype=np.int32))
        if k < 1:
            reasons.append("top_k")
    mutation = rng.randrange(14)
    if mutation == 0:  # a required tensor missing (TOP_K alone may be left out)
        name = rng.choice([spec.QUERY.name, spec.USER_ID.name, spec.CANDIDATE_IDS.name])
        del tensors[name]
        reasons.append(f"missing {name}")
    elif mutation == 1:
        tensors["EXTRA"] = ("INT64", np.array([1], dtype=np.int64))
        reasons.append("extra tensor")
    elif mutation == 2:
        name = rng.choice([spec.USER_ID.name, spec.CANDIDATE_IDS.name])
        tensors[name] = ("FP32", tensors[name][1].astype(np.float32))
        reasons.append(f"{name} as FP32")
    elif mutation == 3 and n >= 2:
        ids = tensors[spec.CANDIDATE_IDS.name][1].copy()
        ids[-1] = ids[0]
        tensors[spec.CANDIDATE_IDS.name] = ("INT64", ids)
        reasons.append("duplicate id")
    elif mutation == 4 and n >= 1:
        ids = tensors[spec.CANDIDATE_IDS.name][1].copy()
        ids[rng.randrange(n)] = -rng.randint(1, 10 ** 6)
        tensors[spec.CANDIDATE_IDS.name] = ("INT64", ids)
        reasons.append("negative id")
    elif mutation == 5:
        tensors[spec.CANDIDATE_IDS.name] = ("INT64", np.arange(1, 5, dtype=np.int64).reshape(2, 2))
        reasons.append("2-D candidates")
    return Case(tensors, not reasons, ", ".join(reasons) or "valid")


def _inputs(case: Case) -> list:
    out = []
    for name, (dtype, array) in case.tensors.items():
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        out.append(t)
    return out


ADMISSION_RETRIES = 5


def _infer_admitted(client, case: Case):
    """One call, repeated while the queue policy refuses it (as SearchClient would): a refusal
    comes before any validation, so it says nothing about the request (spec.ADMISSION_REFUSAL)."""
    for attempt in range(ADMISSION_RETRIES):
        try:
            return client.infer(spec.SEARCH_RANK, _inputs(case), client_timeout=60)
        except InferenceServerException as e:
            refused = "UNAVAILABLE" in str(e.status()) and spec.ADMISSION_REFUSAL in (e.message() or "")
            if not refused or attempt == ADMISSION_RETRIES - 1:
                raise
            time.sleep(0.05 * 2**attempt)


def test_fuzzed_requests_never_crash_and_valid_ones_are_answered(triton):
    rng = random.Random(20261123)
    cases = [random_case(rng) for _ in range(N_REQUESTS)]
    assert sum(c.valid for c in cases) >= N_REQUESTS // 10, "the generator must produce valid requests too"
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    wrong = []
    try:
        for i, case in enumerate(cases):
            try:
                result = _infer_admitted(client, case)
            except InferenceServerException as e:
                if case.valid or "INVALID_ARGUMENT" not in str(e.status()):
                    wrong.append(f"#{i} ({case.why}): {e.status()} {e.message()[:160]}")
                continue
            if not case.valid:
                wrong.append(f"#{i} ({case.why}): answered OK")
                continue
            ids, scores = result.as_numpy(spec.ITEM_IDS.name), result.as_numpy(spec.SCORES.name)
            candidates = case.tensors[spec.CANDIDATE_IDS.name][1]
            top_k = case.tensors.get(spec.TOP_K.name, (None, np.array([len(candidates)])))[1][0]
            ok = (len(ids) == min(int(top_k), len(candidates)) and len(set(ids.tolist())) == len(ids)
                  and set(ids.tolist()) <= set(candidates.tolist()) and np.all(np.diff(scores) <= 0)
                  and np.all((scores > 0) & (scores < 1)))
            if not ok:
                wrong.append(f"#{i} ({case.why}): malformed ranking of {len(ids)} ids")
            assert triton.process.poll() is None, f"tritonserver died at request #{i} ({case.why})"
        assert client.is_server_live() and client.is_model_ready(spec.SEARCH_RANK)
    finally:
        client.close()
    assert not wrong, f"{len(wrong)} of {N_REQUESTS} requests answered wrongly:\n" + "\n".join(wrong[:20])
