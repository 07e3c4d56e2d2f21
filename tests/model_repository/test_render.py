"""The rendered model repository (model_repository.render), read back with Triton's own proto."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from model_repository import runtime
from model_repository.render import Artifacts, render_cpu_repository

pytestmark = pytest.mark.unit

ENSEMBLES = ("search_rank", "text_embed")


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def configs(ci_repository) -> dict[str, model_config_pb2.ModelConfig]:
    return {p.parent.name: parse(p) for p in sorted(Path(ci_repository).glob("*/config.pbtxt"))}


def dtype_name(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


def tensors(cfg: model_config_pb2.ModelConfig, kind: str) -> dict:
    return {t.name: t for t in getattr(cfg, kind)}


# ---- shape compatibility as Triton's ensemble validation sees it ---------------------------

def _dims_match(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def shapes_compatible(dims_a, batching_a: bool, dims_b, batching_b: bool) -> bool:
    """Per-request dims agree (-1 is a wildcard), or, where only one side batches, its dims with the
    implicit leading batch dim (-1) agree with the other side's full shape."""
    a, b = list(dims_a), list(dims_b)
    if _dims_match(a, b):
        return True
    if batching_a and not batching_b:
        return _dims_match([-1] + a, b)
    if batching_b and not batching_a:
        return _dims_match(a, [-1] + b)
    return False


def test_shape_rule_itself():
    # The checker must be able to say no, or the wiring test below proves nothing.
    assert shapes_compatible([384], True, [1, 384], False)
    assert shapes_compatible([-1, 384], False, [384], True)
    assert shapes_compatible([1], True, [-1, 1], False)
    assert not shapes_compatible([384], True, [1, 128], False)
    assert not shapes_compatible([384], False, [1, 384], False)
    assert not shapes_compatible([3], True, [2], True)


# ---- every config ---------------------------------------------------------------------------

def test_repository_holds_every_model_and_ensemble(ci_repository, configs):
    manifest = json.loads((Path(ci_repository) / "MANIFEST.json").read_text())
    assert set(ENSEMBLES) <= set(manifest["ensembles"])
    assert set(manifest["models"]) | set(manifest["ensembles"]) == set(configs)
    assert not set(manifest["models"]) & set(manifest["ensembles"])
    folders = {p.name for p in Path(ci_repository).iterdir() if p.is_dir()}
    assert folders == set(configs)


def test_config_names_match_folders(configs):
    for folder, cfg in configs.items():
        assert cfg.name == folder


def test_composing_models_are_python_backends(ci_repository, configs):
    models = [n for n, c in configs.items() if c.platform != "ensemble"]
    assert len(models) == 2  # CPU: query_encoder (tokenize + encode) and ranker
    for name in models:
        cfg = configs[name]
        assert cfg.backend == "python", name
        assert not cfg.HasField("ensemble_scheduling"), name
        model_py = Path(ci_repository) / name / "1" / "model.py"
        assert model_py.is_file(), name
        assert "TritonPythonModel" in model_py.read_text()


def test_ensembles(configs):
    for name in ENSEMBLES:
        cfg = configs[name]
        assert cfg.platform == "ensemble" and cfg.backend == ""
        assert cfg.max_batch_size == 0
        assert len(cfg.ensemble_scheduling.step) >= 1


# ---- ensemble wiring ------------------------------------------------------------------------

@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_ensemble_steps_use_real_model_tensors(configs, ensemble):
    for step in configs[ensemble].ensemble_scheduling.step:
        assert step.model_name in configs, step.model_name
        model = configs[step.model_name]
        assert set(step.input_map) <= set(tensors(model, "input")), step.model_name
        assert set(step.output_map) <= set(tensors(model, "output")), step.model_name
        # Every required model input is fed.
        required = {n for n, t in tensors(model, "input").items() if not t.optional}
        assert required <= set(step.input_map), step.model_name


@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_ensemble_dataflow(configs, ensemble):
    cfg = configs[ensemble]
    ens_in, ens_out = tensors(cfg, "input"), tensors(cfg, "output")
    # ensemble tensor -> (dtype, dims, batching) of whoever provides it
    available = {n: (t.data_type, list(t.dims), False) for n, t in ens_in.items()}
    for step in cfg.ensemble_scheduling.step:
        model = configs[step.model_name]
        batching = model.max_batch_size > 0
        model_in, model_out = tensors(model, "input"), tensors(model, "output")
        for model_name, ens_name in step.input_map.items():
            assert ens_name in available, f"{step.model_name} reads {ens_name} before anything produces it"
            dtype, dims, src_batching = available[ens_name]
            t = model_in[model_name]
            assert t.data_type == dtype, f"{ensemble}: {ens_name} -> {step.model_name}.{model_name} dtype"
            assert shapes_compatible(dims, src_batching, t.dims, batching), \
                f"{ensemble}: {ens_name} {dims} -> {step.model_name}.{model_name} {list(t.dims)}"
        for model_name, ens_name in step.output_map.items():
            assert ens_name not in available, f"{ens_name} produced twice"
            t = model_out[model_name]
            available[ens_name] = (t.data_type, list(t.dims), batching)
    for name, t in ens_out.items():
        assert name in available, f"ensemble output {name} is never produced"
        dtype, dims, batching = available[name]
        assert t.data_type == dtype, name
        assert shapes_compatible(t.dims, False, dims, batching), name
    # Internal tensors are private by convention.
    internal = set(available) - set(ens_in) - set(ens_out)
    assert all(n.startswith("_") for n in internal), internal


# ---- the public contract (DESIGN.md, "The serving contract") -----------------------------

SEARCH_RANK_CONTRACT = {
    "input": {
        "QUERY": ("TYPE_STRING", [1], False),
        "USER_ID": ("TYPE_INT64", [1], False),
        "CANDIDATE_IDS": ("TYPE_INT64", [-1], False),
        "TOP_K": ("TYPE_INT32", [1], True),
    },
    "output": {
        "ITEM_IDS": ("TYPE_INT64", [-1], False),
        "SCORES": ("TYPE_FP32", [-1], False),
    },
}
TEXT_EMBED_CONTRACT = {
    "input": {"TEXT": ("TYPE_STRING", [1], False)},
    "output": {"EMBEDDING": ("TYPE_FP32", [384], False)},  # all-MiniLM-L6-v2: d = 384
}


@pytest.mark.parametrize("ensemble, contract", [("search_rank", SEARCH_RANK_CONTRACT),
                                                ("text_embed", TEXT_EMBED_CONTRACT)])
def test_public_contract(configs, ensemble, contract):
    cfg = configs[ensemble]
    for kind, expected in contract.items():
        actual = {t.name: (dtype_name(t.data_type), list(t.dims), getattr(t, "optional", False)) for t in getattr(cfg, kind)}
        assert actual == expected, f"{ensemble} {kind}"


# ---- batching and hops ------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["query_encoder", "ranker"])
def test_dynamic_batching(configs, model):
    cfg = configs[model]
    assert cfg.max_batch_size > 1
    assert cfg.HasField("dynamic_batching")


@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_cpu_request_crosses_at_most_two_python_models(configs, ensemble):
    steps = configs[ensemble].ensemble_scheduling.step
    python_steps = [s.model_name for s in steps if configs[s.model_name].backend == "python"]
    assert len(python_steps) <= 2, python_steps


def test_nothing_per_candidate_crosses_a_model_boundary(configs):
    # The only tensor between the two search_rank steps is one query embedding per request.
    produced = {v for s in configs["search_rank"].ensemble_scheduling.step for v in s.output_map.values()}
    internal = produced - set(tensors(configs["search_rank"], "output"))
    assert internal == {"_query_embedding"}
    encoder_out = tensors(configs["query_encoder"], "output")["EMBEDDING"]
    assert list(encoder_out.dims) == [384]


def test_ranker_batches_requests_of_any_candidate_count(configs):
    ranker = configs["ranker"]
    inputs = tensors(ranker, "input")
    # Requests, not candidate rows, are its batch axis; each brings its own [N] candidates.
    assert inputs["CANDIDATE_IDS"].allow_ragged_batch and list(inputs["CANDIDATE_IDS"].dims) == [-1]
    assert not any(t.allow_ragged_batch for n, t in inputs.items() if n != "CANDIDATE_IDS")
    assert inputs["TOP_K"].optional


@pytest.mark.parametrize("model", ["query_encoder", "ranker"])
def test_every_model_refuses_what_waited_too_long(configs, model):
    from model_repository.spec import DEFAULT_QUEUE_POLICY

    policy = configs[model].dynamic_batching.default_queue_policy
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert policy.default_timeout_microseconds == DEFAULT_QUEUE_POLICY.timeout_us > 0
    # a queue-full rejection stalled the ensemble on this Triton (spec.QueuePolicy): no length cap
    assert policy.max_queue_size == 0
    assert policy.allow_timeout_override


def test_queue_policy_is_validated_and_can_be_left_out():
    from model_repository import spec
    from model_repository.render import model_config

    with pytest.raises(ValueError, match="timeout_us"):
        spec.QueuePolicy(timeout_us=0)
    with pytest.raises(ValueError, match="max_queue_size"):
        spec.QueuePolicy(timeout_us=1000, max_queue_size=-1)
    with pytest.raises(ValueError, match="target"):
        spec.build_spec(8, target="tpu")
    for target in spec.TARGETS:
        unbounded = spec.build_spec(8, target=target, queue_policy=None)
        for m in unbounded.models:
            if m.dynamic_batching is not None:
                assert not model_config(m).dynamic_batching.HasField("default_queue_policy")


# ---- atomic render ---------------------------------------------------------------------------

def test_render_with_missing_artifact_leaves_output_untouched(ci_models, ci_pipeline, tmp_path):
    out = tmp_path / "model_repository"
    out.mkdir()
    (out / "marker.txt").write_text("keep me")
    artifacts = Artifacts(encoder_dir=ci_models["encoder"], catalog_dir=ci_models["catalog_artifact"],
                          ranker_dir=tmp_path / "no-such-ranker")
    with pytest.raises(FileNotFoundError, match="ranker.onnx"):
        render_cpu_repository(ci_pipeline, artifacts, out)
    assert [p.name for p in out.iterdir()] == ["marker.txt"]
    assert (out / "marker.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_render_replaces_existing_output(ci_models, ci_pipeline, tmp_path):
    out = tmp_path / "model_repository"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    artifacts = Artifacts(encoder_dir=ci_models["encoder"], catalog_dir=ci_models["catalog_artifact"],
                          ranker_dir=ci_models["ranker"])
    assert render_cpu_repository(ci_pipeline, artifacts, out) == out
    assert not (out / "stale.txt").exists()
    assert (out / "search_rank" / "config.pbtxt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_repository"]
    # Served files are real files (hard links or copies), never symlinks.
    assert not [p for p in out.rglob("*") if p.is_symlink()]
    assert (out / "ranker" / "1" / "ranker.onnx").is_file()
    assert (runtime.served_catalog_dir(out) / "item_ids.npy").is_file()


def test_gpu_rendering_serves_the_encoder_from_a_tensorrt_plan(ci_models, ci_pipeline, ci_repository, tmp_path):
    from model_repository import spec
    from model_repository.render import TRT_PLAN, render_gpu_repository

    plan = tmp_path / "encoder.plan"
    plan.write_bytes(b"not a real engine: only the layout and config are checked here")
    artifacts = Artifacts(encoder_dir=ci_models["encoder"], catalog_dir=ci_models["catalog_artifact"],
                          ranker_dir=ci_models["ranker"])
    with pytest.raises(ValueError, match="GPU pipeline"):
        render_gpu_repository(ci_pipeline, artifacts, tmp_path / "wrong", encoder_plan=plan)
    dim = ci_pipeline.model(spec.QUERY_ENCODER).outputs[0].dims[0]
    gpu_pipeline = spec.build_spec(dim, target=spec.GPU)
    repo = render_gpu_repository(gpu_pipeline, artifacts, tmp_path / "gpu_repo", encoder_plan=plan)
    configs = {p.parent.name: parse(p) for p in repo.glob("*/config.pbtxt")}
    gpu = configs[spec.QUERY_ENCODER]
    cpu = parse(Path(ci_repository) / spec.QUERY_ENCODER / "config.pbtxt")
    assert gpu.platform == "tensorrt_plan" and not gpu.backend and gpu.default_model_filename == TRT_PLAN
    assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    # The plan takes token ids (the ONNX graph's inputs); the text encoding's output is the same.
    assert [t.name for t in gpu.input] == [spec.INPUT_IDS.name, spec.ATTENTION_MASK.name]
    assert [(t.name, t.data_type, list(t.dims)) for t in gpu.output] == \
           [(t.name, t.data_type, list(t.dims)) for t in cpu.output]
    version = repo / spec.QUERY_ENCODER / "1"
    assert sorted(p.name for p in version.iterdir()) == [TRT_PLAN]
    assert (version / TRT_PLAN).read_bytes() == plan.read_bytes()
    # Python steps around the plan: still two per request, the ranker rendered exactly as on CPU.
    for ensemble in ENSEMBLES:
        steps = [s.model_name for s in configs[ensemble].ensemble_scheduling.step]
        assert sum(configs[m].backend == "python" for m in steps) <= 2, steps
        assert spec.QUERY_ENCODER in steps
    assert configs[spec.TOKENIZER].backend == "python"
    assert (repo / spec.RANKER / "config.pbtxt").read_text() == \
           (Path(ci_repository) / spec.RANKER / "config.pbtxt").read_text()
    for ensemble in ENSEMBLES:  # the public contract does not depend on the target
        assert [(t.name, t.data_type, list(t.dims)) for t in configs[ensemble].input] == \
               [(t.name, t.data_type, list(t.dims)) for t in parse(Path(ci_repository) / ensemble / "config.pbtxt").input]
    assert json.loads((repo / "MANIFEST.json").read_text())["target"] == "gpu"


# ---- embedding cache and instances ---------------------------------------------------------

def test_query_encoder_keeps_a_bounded_embedding_cache_and_nothing_uses_tritons(configs):
    from model_repository.spec import QUERY_CACHE_ENTRIES

    assert configs["query_encoder"].parameters["cache_entries"].string_value == str(QUERY_CACHE_ENTRIES)
    assert QUERY_CACHE_ENTRIES > 0
    # Triton 2.51's response cache stores refusals as empty successes (docs/architecture.md)
    assert not any(cfg.response_cache.enable for cfg in configs.values())


def test_cache_size_is_a_spec_setting_and_zero_turns_it_off():
    from model_repository import spec
    from model_repository.render import model_config

    off = spec.build_spec(384, query_cache_entries=0)
    (encoder,) = [m for m in off.models if m.name == spec.QUERY_ENCODER]
    assert model_config(encoder).parameters["cache_entries"].string_value == "0"
    with pytest.raises(ValueError, match="query_cache_entries"):
        spec.build_spec(384, query_cache_entries=-1)


def test_ranker_has_two_instances_on_cpu(configs):
    from model_repository.spec import CPU_RANKER_INSTANCES

    # one instance left its batcher stalled once the cache made the ranker the busy model
    assert [g.count for g in configs["ranker"].instance_group] == [CPU_RANKER_INSTANCES] and CPU_RANKER_INSTANCES >= 2
