"""Render a Triton model repository from the pipeline spec and the built artifacts.

Configs are typed `model_config_pb2.ModelConfig` messages (Triton's own proto, shipped with
tritonclient) written with protobuf text_format, so a field that Triton does not know cannot
be written. The repository is assembled in a scratch folder and swapped in whole.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from model_repository import runtime, spec
from model_repository.catalog_store import create_store, place
from model_repository.paths import build_root

log = logging.getLogger(__name__)

_DTYPES = {spec.BYTES: mc.TYPE_STRING, spec.INT32: mc.TYPE_INT32, spec.INT64: mc.TYPE_INT64, spec.FP32: mc.TYPE_FP32}
CONFIG = "config.pbtxt"


@dataclass(frozen=True)
class Artifacts:
    """Built stage folders that the CPU repository serves from."""

    encoder_dir: Path  # encoder.onnx, tokenizer.json
    catalog_dir: Path  # catalog artifact tables
    ranker_dir: Path  # ranker.onnx
    # Which ranker file of ranker_dir is served (as ranker.onnx): the compressed default, or e.g.
    # the stage's FP32 export for a side-by-side comparison (loadtests.side_by_side).
    ranker_source: str = runtime.RANKER_FILE

    def folders(self) -> tuple[Path, Path, Path]:
        return self.encoder_dir, self.catalog_dir, self.ranker_dir

    @property
    def ranker_file(self) -> Path:
        return self.ranker_dir / self.ranker_source


def _tensor(t: spec.Tensor, cls):
    msg = cls(name=t.name, data_type=_DTYPES[t.dtype], dims=list(t.dims))
    if t.optional:
        msg.optional = True
    return msg


def text_label(pipeline: spec.PipelineSpec) -> str:
    """Names of the ensemble inputs that feed the text model, for its error messages."""
    names = [step.input_map[spec.ENCODER_TEXT.name] for e in pipeline.ensembles for step in e.steps
             if spec.ENCODER_TEXT.name in step.input_map]
    return "/".join(dict.fromkeys(names))


def model_config(model: spec.Model, extra_parameters: dict[str, str] | None = None) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=model.name, backend="python", max_batch_size=model.max_batch_size)
    cfg.input.extend(_tensor(t, mc.ModelInput) for t in model.inputs)
    cfg.output.extend(_tensor(t, mc.ModelOutput) for t in model.outputs)
    for tensor in cfg.input:
        if tensor.name in model.ragged_inputs:
            tensor.allow_ragged_batch = True
    if model.dynamic_batching is not None:
        cfg.dynamic_batching.max_queue_delay_microseconds = model.dynamic_batching.max_queue_delay_us
        cfg.dynamic_batching.preferred_batch_size.extend(model.dynamic_batching.preferred_batch_size)
        queue = model.dynamic_batching.queue
        if queue is not None:
            policy = cfg.dynamic_batching.default_queue_policy
            policy.max_queue_size = queue.max_queue_size
            policy.timeout_action = mc.ModelQueuePolicy.REJECT
            policy.default_timeout_microseconds = queue.timeout_us
            # a request may carry its own queue timeout (e.g. what is left of its caller's deadline)
            policy.allow_timeout_override = True
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=model.instance_count)
    for key, value in {**model.parameters, **(extra_parameters or {})}.items():
        cfg.parameters[key].string_value = value
    return cfg


TRT_PLAN = "model.plan"


def tensorrt_config(model: spec.Model, gpus: int = 1) -> mc.ModelConfig:
    """A spec model served from a TensorRT plan on the GPU (GPU target only).

    Names, dtypes, dims and batching come from the spec entry like any other model; only the
    platform and the instance kind differ.
    """
    if model.platform != spec.TENSORRT:
        raise ValueError(f"model {model.name!r} is a {model.platform} model, not a TensorRT plan")
    cfg = model_config(model)
    cfg.ClearField("backend")
    cfg.ClearField("parameters")
    cfg.platform = spec.TENSORRT
    cfg.default_model_filename = TRT_PLAN
    del cfg.instance_group[:]
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=gpus)
    return cfg


def config_for(pipeline: spec.PipelineSpec, model: spec.Model) -> mc.ModelConfig:
    """The config.pbtxt message of one composing model, as render writes it."""
    if model.platform == spec.TENSORRT:
        return tensorrt_config(model)
    extra = {"text_label": text_label(pipeline)} if spec.ENCODER_TEXT in model.inputs else None
    return model_config(model, extra)


def ensemble_config(ensemble: spec.Ensemble) -> mc.ModelConfig:
    # Ensembles never batch or queue themselves; their composing models do.
    cfg = mc.ModelConfig(name=ensemble.name, platform="ensemble", max_batch_size=0)
    cfg.input.extend(_tensor(t, mc.ModelInput) for t in ensemble.inputs)
    cfg.output.extend(_tensor(t, mc.ModelOutput) for t in ensemble.outputs)
    for step in ensemble.steps:
        s = cfg.ensemble_scheduling.step.add(model_name=step.model, model_version=-1)
        s.input_map.update(step.input_map)
        s.output_map.update(step.output_map)
    return cfg


def write_config(cfg: mc.ModelConfig, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(text_format.MessageToString(cfg))


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def model_files(pipeline: spec.PipelineSpec, artifacts: Artifacts,
                encoder_plan: Path | None = None) -> dict[str, dict[str, Path]]:
    """Per model: destination name inside the version folder -> source path."""
    tokenizer = {runtime.TOKENIZER_FILE: artifacts.encoder_dir / runtime.TOKENIZER_FILE}
    ranker = {runtime.RANKER_FILE: artifacts.ranker_file, runtime.CATALOG_FOLDER: artifacts.catalog_dir}
    if pipeline.target == spec.CPU:
        return {spec.QUERY_ENCODER: {**tokenizer, runtime.ENCODER_FILE: artifacts.encoder_dir / runtime.ENCODER_FILE},
                spec.RANKER: ranker}
    if encoder_plan is None:
        raise ValueError("the GPU rendering needs --encoder-plan (the TensorRT plan built on the node)")
    return {spec.TOKENIZER: tokenizer, spec.QUERY_ENCODER: {TRT_PLAN: Path(encoder_plan)}, spec.RANKER: ranker}


def render_cpu_repository(pipeline: spec.PipelineSpec, artifacts: Artifacts, out: Path) -> Path:
    """Write the CPU repository (python-backend models hosting ONNX Runtime) to `out`."""
    return render_repository(pipeline, artifacts, out)


def render_gpu_repository(pipeline: spec.PipelineSpec, artifacts: Artifacts, out: Path, encoder_plan: Path) -> Path:
    """The GPU node's repository: the query encoder is a TensorRT plan built on that node."""
    return render_repository(pipeline, artifacts, out, encoder_plan=encoder_plan)


def render_repository(pipeline: spec.PipelineSpec, artifacts: Artifacts, out: Path,
                      encoder_plan: Path | None = None) -> Path:
    """Render `pipeline` (its target decides the layout); a GPU pipeline needs `encoder_plan`."""
    out = Path(out)
    if encoder_plan is not None and pipeline.target != spec.GPU:
        raise ValueError("an encoder plan is served only by the GPU pipeline (spec.build_spec(target='gpu'))")
    files = model_files(pipeline, artifacts, encoder_plan)
    for sources in files.values():
        for src in sources.values():
            if not src.exists():
                raise FileNotFoundError(f"artifact missing: {src} (run `make models` first)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for model in pipeline.models:
            version = tmp / model.name / "1"
            version.mkdir(parents=True)
            write_config(config_for(pipeline, model), tmp / model.name)
            if model.platform == spec.PYTHON:
                (version / "model.py").write_text(
                    f"from model_repository.backends.{model.backend_module} import TritonPythonModel  # noqa: F401\n")
            for name, src in files[model.name].items():
                if name == runtime.CATALOG_FOLDER:
                    create_store(version / name, src)  # versioned, so a new catalog can be swapped in
                else:
                    place(src, version / name)
        for ensemble in pipeline.ensembles:
            write_config(ensemble_config(ensemble), tmp / ensemble.name)
            (tmp / ensemble.name / "1").mkdir()
        (tmp / "MANIFEST.json").write_text(json.dumps({
            "target": pipeline.target,
            "artifacts": {k: str(v) for k, v in vars(artifacts).items()},
            "models": [m.name for m in pipeline.models], "ensembles": [e.name for e in pipeline.ensembles],
        }, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("rendered %s", out)
    return out


def write_artifacts_manifest(path: Path, artifacts: Artifacts, embedding_dim: int) -> Path:
    """What the build hands the renderer: the served stage folders and the encoder's width. Written
    by the conversion stages (`conversion.build_models --manifest`), read here, so rendering needs
    neither torch nor the conversion code."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**{k: str(v) for k, v in vars(artifacts).items()}, "embedding_dim": int(embedding_dim)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def read_artifacts_manifest(path: Path) -> tuple[Artifacts, int]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no artifacts manifest at {path} (run `make models`)")
    try:
        body = json.loads(path.read_text())
        artifacts = Artifacts(encoder_dir=Path(body["encoder_dir"]), catalog_dir=Path(body["catalog_dir"]),
                              ranker_dir=Path(body["ranker_dir"]),
                              ranker_source=body.get("ranker_source", runtime.RANKER_FILE))
        return artifacts, int(body["embedding_dim"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"artifacts manifest {path} is malformed: {e!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_repository.render", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, required=True,
                   help="artifacts manifest written by `python -m conversion.build_models --manifest FILE`")
    p.add_argument("--encoder-plan", type=Path,
                   help="GPU rendering: serve the query encoder from this TensorRT plan (built on the node)")
    p.add_argument("--out", type=Path, help="repository folder (default: build/model_repository)")
    p.add_argument("--ort-threads", type=int, default=spec.DEFAULT_ORT_THREADS,
                   help="ONNX Runtime threads per model instance (encoder and ranker)")
    p.add_argument("--query-cache-entries", type=int, default=spec.QUERY_CACHE_ENTRIES,
                   help="texts each CPU query encoder instance keeps embeddings of (0: no cache)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        artifacts, dim = read_artifacts_manifest(args.artifacts)
        target = spec.GPU if args.encoder_plan else spec.CPU
        pipeline = spec.build_spec(dim, target=target, ort_threads=args.ort_threads,
                                   query_cache_entries=args.query_cache_entries)
        out = render_repository(pipeline, artifacts, args.out or build_root() / "model_repository",
                                encoder_plan=args.encoder_plan)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
