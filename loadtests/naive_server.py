"""The baseline for side-by-side benchmarks: `search_rank` as the naive service a team writes first.

Eager FP32 PyTorch (the HF encoder through `transformers.AutoModel`, the unpruned FP32 ranker),
one request at a time per worker thread, behind a plain grpcio server. No ONNX Runtime, no
quantization or pruning, no batching across requests. It speaks Triton's KServe v2 gRPC protocol
(`ModelInfer` for `search_rank` and `text_embed`, the liveness and readiness calls), so
`tritonclient.grpc` and `search_rank_client.SearchClient` call it unchanged.

Semantics follow the Triton ensemble: the same catalog artifact (cold-start row for unknown ids,
default user), the same value checks and messages (the python backends' own functions), the same
top-k selection; malformed tensors are refused before any model runs, as Triton's core does.
Only the models differ numerically: the FP32 teacher encoder and unpruned ranker here, the
compressed ones there.

    python -m loadtests.naive_server --profile ci --port 9001
"""
from __future__ import annotations

import argparse
import logging
import os
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

from model_repository import spec

# The backends' request checks are reused so both servers refuse the same requests with the same
# messages. Their modules import triton_python_backend_utils, which exists only inside Triton's
# stub; these functions never touch it, so an empty stand-in is enough (as in the backend tests).
sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
from model_repository.backends.common import BadRequest  # noqa: E402
from model_repository.backends.candidates import validate_ids  # noqa: E402
from model_repository.backends.tokenizer import decode_text  # noqa: E402
from model_repository.backends.top_k import select_top_k  # noqa: E402

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "naive {model} ready on {host}:{port}"
# The thread count each served model gets, so a comparison measures the stack, not the thread budget.
DEFAULT_THREADS = spec.DEFAULT_ORT_THREADS
# grpcio's own examples use 10 workers; that is what a first version ships with.
DEFAULT_WORKERS = 10
STOP_GRACE_S = 5.0


# ---- the model ------------------------------------------------------------------------------


class NaiveSearchRank:
    """Encoder, catalog tables and ranker in eager FP32 PyTorch; `rank` raises BadRequest like the
    ensemble's steps do."""

    def __init__(self, model_dir: Path, max_length: int, catalog_dir: Path, ranker_dir: Path,
                 threads: int = DEFAULT_THREADS):
        import torch

        from conversion.export_encoder import load_torch_encoder
        from conversion.train_ranker import RANKER_FP32_WEIGHTS, load_ranker
        from model_repository.runtime import CatalogTables

        torch.set_num_threads(threads)
        self._torch = torch
        # AutoModel, eager attention, FP32, with the export's mean pooling + L2 norm and truncation.
        self.encoder, self.tokenizer = load_torch_encoder(model_dir, max_length)
        self.tables = CatalogTables.load(catalog_dir, mmap=False)
        self.ranker = load_ranker(Path(ranker_dir), RANKER_FP32_WEIGHTS)
        self.embedding_dim = self.tables.embedding_dim
        log.info("loaded %s (max length %d), %d catalog items, ranker %s/%s, %d threads", model_dir, max_length,
                 len(self.tables.item_ids), Path(ranker_dir).name, RANKER_FP32_WEIGHTS, threads)

    @classmethod
    def for_profile(cls, profile: str, threads: int = DEFAULT_THREADS) -> "NaiveSearchRank":
        """The FP32 teacher of a built profile, with the catalog artifact and ranker stage Triton serves."""
        from conversion.build_models import built_artifacts, profile_settings
        from conversion.export_encoder import model_dir_of

        artifacts, _ = built_artifacts(profile)
        teacher = profile_settings(profile).artifact.encoder
        return cls(model_dir_of(teacher.model), teacher.max_length, artifacts.catalog_dir, artifacts.ranker_dir,
                   threads)

    def embed(self, text: str) -> np.ndarray:
        """L2-normalised embedding [d]; one text, so there is no padding to mask."""
        torch = self._torch
        ids = torch.tensor([self.tokenizer.encode(text).ids], dtype=torch.int64)
        with torch.inference_mode():
            return self.encoder(ids, torch.ones_like(ids))[0].numpy()

    def scores(self, query_embedding: np.ndarray, user_id: int, candidate_ids: np.ndarray) -> np.ndarray:
        torch = self._torch
        item_rows = self.tables.item_rows(candidate_ids)
        user_row = self.tables.user_rows(np.array([user_id]))
        n = len(candidate_ids)
        with torch.inference_mode():
            probs = self.ranker(torch.from_numpy(query_embedding).reshape(1, -1).expand(n, -1),
                                torch.from_numpy(self.tables.item_embeddings[item_rows]),
                                torch.from_numpy(self.tables.item_features[item_rows]),
                                torch.from_numpy(self.tables.user_features[user_row]).expand(n, -1))
        return probs.numpy().reshape(-1)

    def embed_text(self, text: bytes) -> np.ndarray:
        return self.embed(decode_text(text, spec.TEXT.name, spec.MAX_QUERY_BYTES))

    def rank(self, query: bytes, user_id: int, candidate_ids: np.ndarray,
             top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ITEM_IDS int64 [k], SCORES float32 [k]), best first, ties in request order."""
        text = decode_text(query, spec.QUERY.name, spec.MAX_QUERY_BYTES)
        candidates = np.asarray(candidate_ids, dtype=np.int64)
        validate_ids(np.array([user_id], dtype=np.int64), candidates, spec.MAX_CANDIDATES)
        probs = self.scores(self.embed(text), int(user_id), candidates)
        k = None if top_k is None else np.array([top_k], dtype=triton_to_np_dtype(spec.TOP_K.dtype))
        return select_top_k(probs, candidates, k)


# ---- KServe v2 tensors ----------------------------------------------------------------------


def read_inputs(ensemble: spec.Ensemble, request: service_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's tensors from raw_input_contents, checked against the ensemble's declared inputs
    (names, dtypes, dims) as Triton's core checks them before any model runs."""
    declared = {t.name: t for t in ensemble.inputs}
    names = [t.name for t in request.inputs]
    for name in names:
        if name not in declared:
            raise BadRequest(f"unexpected inference input '{name}' for model '{ensemble.name}'")
        if names.count(name) > 1:
            raise BadRequest(f"input '{name}' is given more than once")
    missing = [t.name for t in ensemble.inputs if not t.optional and t.name not in names]
    if missing:
        raise BadRequest(f"missing required input(s) {missing} for model '{ensemble.name}'")
    if len(request.raw_input_contents) != len(request.inputs):
        raise BadRequest(f"every input must be sent in raw_input_contents; got {len(request.raw_input_contents)} "
                         f"for inputs {names}")
    arrays = {}
    for tensor, raw in zip(request.inputs, request.raw_input_contents):
        want = declared[tensor.name]
        if tensor.datatype != want.dtype:
            raise BadRequest(f"unexpected datatype {tensor.datatype} for inference input '{tensor.name}', "
                             f"expecting {want.dtype}")
        shape = [int(d) for d in tensor.shape]
        if len(shape) != len(want.dims) or any(w != -1 and d != w for d, w in zip(shape, want.dims)) \
                or any(d < 0 for d in shape):
            raise BadRequest(f"unexpected shape for input '{tensor.name}' for model '{ensemble.name}'. "
                             f"Expected {list(want.dims)}, got {shape}")
        count = int(np.prod(shape))
        if want.dtype == spec.BYTES:
            try:
                array = deserialize_bytes_tensor(raw)
            except struct.error:
                raise BadRequest(f"input '{tensor.name}' holds malformed BYTES contents") from None
        else:
            dtype = np.dtype(triton_to_np_dtype(want.dtype))
            if len(raw) != count * dtype.itemsize:
                raise BadRequest(f"input '{tensor.name}' has {len(raw)} bytes of contents; shape {shape} of "
                                 f"{want.dtype} needs {count * dtype.itemsize}")
            array = np.frombuffer(raw, dtype=dtype)
        if array.size != count:
            raise BadRequest(f"input '{tensor.name}' holds {array.size} elements; shape {shape} needs {count}")
        arrays[tensor.name] = array.reshape(shape)
    return arrays


def infer_response(ensemble: spec.Ensemble, request: service_pb2.ModelInferRequest,
                   outputs: dict[str, np.ndarray]) -> service_pb2.ModelInferResponse:
    """The requested outputs (all when none are named) as raw_output_contents."""
    declared = {t.name: t for t in ensemble.outputs}
    names = [o.name for o in request.outputs] or [t.name for t in ensemble.outputs]
    response = service_pb2.ModelInferResponse(model_name=ensemble.name, model_version="1", id=request.id)
    for name in names:
        if name not in declared:
            raise BadRequest(f"unexpected inference output '{name}' for model '{ensemble.name}'")
        array = np.ascontiguousarray(outputs[name], dtype=triton_to_np_dtype(declared[name].dtype))
        response.outputs.add(name=name, datatype=declared[name].dtype, shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    return response


class NaiveServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer for the public ensembles plus what readiness probes call; the rest is UNIMPLEMENTED."""

    def __init__(self, model: NaiveSearchRank):
        self.model = model
        self.ensembles = {e.name: e for e in spec.build_spec(model.embedding_dim).ensembles}

    def _run(self, name: str, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if name == spec.TEXT_EMBED:
            emb = self.model.embed_text(x[spec.TEXT.name].reshape(-1)[0])
            return {spec.text_embedding(0).name: emb}
        top_k = x.get(spec.TOP_K.name)
        ids, scores = self.model.rank(x[spec.QUERY.name].reshape(-1)[0], int(x[spec.USER_ID.name].reshape(-1)[0]),
                                      x[spec.CANDIDATE_IDS.name], None if top_k is None else int(top_k.reshape(-1)[0]))
        return {spec.ITEM_IDS.name: ids, spec.SCORES.name: scores}

    def ModelInfer(self, request, context):
        ensemble = self.ensembles.get(request.model_name)
        if ensemble is None or request.model_version not in ("", "1"):
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Request for unknown model: '{request.model_name}' version "
                          f"'{request.model_version or '-1'}' is not found")
        try:
            return infer_response(ensemble, request, self._run(ensemble.name, read_inputs(ensemble, request)))
        except BadRequest as err:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, f"{ensemble.name}: {err}"
        except Exception as err:  # noqa: BLE001 - grpcio would answer UNKNOWN without a message
            log.exception("%s failed", ensemble.name)
            code, message = grpc.StatusCode.INTERNAL, f"{ensemble.name}: {type(err).__name__}: {err}"
        context.abort(code, message)

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=request.name in self.ensembles
                                              and request.version in ("", "1"))

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name="naive-search-rank", version="1", extensions=[])

    def _ensemble(self, name: str, version: str, context) -> spec.Ensemble:
        ensemble = self.ensembles.get(name)
        if ensemble is None or version not in ("", "1"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found")
        return ensemble

    # Metadata and config in Triton's form: what perf_analyzer reads before it sends a request, so
    # Triton's own load tool can measure this service too (`make bench`). The service is one process,
    # so it describes itself as one non-batching model, not an ensemble (perf_analyzer would then ask
    # for composing models that do not exist).
    def ModelMetadata(self, request, context):
        ensemble = self._ensemble(request.name, request.version, context)
        resp = service_pb2.ModelMetadataResponse(name=ensemble.name, versions=["1"], platform="python")
        for kind, tensors in (("inputs", ensemble.inputs), ("outputs", ensemble.outputs)):
            for t in tensors:
                getattr(resp, kind).add(name=t.name, datatype=t.dtype, shape=list(t.dims))
        return resp

    def ModelConfig(self, request, context):
        from model_repository.render import ensemble_config

        ensemble = self._ensemble(request.name, request.version, context)
        config = ensemble_config(ensemble)
        config.ClearField("platform")
        config.ClearField("ensemble_scheduling")
        config.backend = "python"
        return service_pb2.ModelConfigResponse(config=config)


def serve(model: NaiveSearchRank, host: str, port: int, workers: int = DEFAULT_WORKERS) -> tuple[grpc.Server, int]:
    """A started server and the port it bound (port 0 picks a free one)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(NaiveServicer(model), server)
    bound = server.add_insecure_port(f"{host}:{port}")  # grpcio raises RuntimeError if it cannot bind
    server.start()
    return server, bound


# ---- CLI and launcher -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from conversion.build_models import PROFILES

    p = argparse.ArgumentParser(prog="python -m loadtests.naive_server", description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="default", help="built models to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port (0: a free one, printed in the ready line)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="gRPC worker threads")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in 0..65535, got {args.port}")
    for name in ("threads", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.logging.disable_progress_bar()  # a weight-loading bar is noise in a server log
    try:
        model = NaiveSearchRank.for_profile(args.profile, threads=args.threads)
    except FileNotFoundError as e:
        p.error(str(e))
    # The first real request should not pay for lazy initialisation.
    model.rank(b"warm up the naive server", 0, model.tables.item_ids[:100])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server, port = serve(model, args.host, args.port, args.workers)
    except RuntimeError as e:
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    print(READY_LINE.format(model=spec.SEARCH_RANK, host=args.host, port=port), flush=True)
    while not stop.wait(0.5):
        pass
    log.info("stopping (in-flight calls get %.0f s)", STOP_GRACE_S)
    server.stop(STOP_GRACE_S).wait()
    return 0


class NaiveServerStartError(RuntimeError):
    """The naive server exited or did not print its ready line; the message carries its stderr tail."""


@dataclass
class NaiveServer:
    process: subprocess.Popen
    grpc_url: str
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _ready_port(server: NaiveServer, timeout_s: float) -> int:
    prefix = READY_LINE.format(model=spec.SEARCH_RANK, host="", port="").rstrip(":").encode()
    out, deadline = b"", time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(server.process.stdout, selectors.EVENT_READ)
        while b"\n" not in out:
            if time.monotonic() > deadline:
                raise NaiveServerStartError(f"no ready line after {timeout_s:.0f} s:\n{server.log_tail()}")
            if sel.select(timeout=0.25):
                chunk = os.read(server.process.stdout.fileno(), 4096)
                out += chunk
                if chunk:
                    continue
            if server.process.poll() is not None:
                raise NaiveServerStartError(f"naive server exited with code {server.process.returncode} before it "
                                            f"was ready:\n{server.log_tail()}")
    line = out.split(b"\n", 1)[0].strip()
    if not line.startswith(prefix):
        raise NaiveServerStartError(f"unexpected first line {line!r}:\n{server.log_tail()}")
    return int(line.rsplit(b":", 1)[1])


@contextmanager
def run_naive_server(profile: str, port: int | None = None, cpus: tuple[int, ...] | None = None,
                     threads: int = DEFAULT_THREADS, workers: int = DEFAULT_WORKERS, host: str = "127.0.0.1",
                     startup_timeout_s: float = 180.0) -> Iterator[NaiveServer]:
    """Start the CLI (pinned to `cpus` when given), wait for its ready line, always stop it."""
    fd, log_name = tempfile.mkstemp(prefix="naive-server-", suffix=".log")
    cmd = [sys.executable, "-m", "loadtests.naive_server", "--profile", profile, "--host", host,
           "--port", str(port or 0), "--threads", str(threads), "--workers", str(workers)]
    # Its own process group, so stopping it reaches anything it started.
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fd,
                               start_new_session=True,
                               preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
    os.close(fd)
    server = NaiveServer(process, "", Path(log_name))
    try:
        server.grpc_url = f"{host}:{_ready_port(server, startup_timeout_s)}"
        log.info("naive server ready on %s (log %s)", server.grpc_url, log_name)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_GRACE_S + 10)
            except subprocess.TimeoutExpired:
                log.warning("naive server did not stop after SIGINT; killing it")
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
        process.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
