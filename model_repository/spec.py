"""The pipeline spec: the one place that names models, tensors, dtypes, dims and batching.

Configs (`model_repository.render`), the python-backend models, the ONNX exports and the tests
all read names and shapes from here; nothing else spells a tensor name.

The public contract (DESIGN.md) is the two ensembles `search_rank` and `text_embed`; its names,
dtypes and limits come from `search_rank_client.contract` (the client distribution owns them),
and the composing models behind them may change without clients noticing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# The public contract (tensor names, dtypes, limits) is owned by the client package that services
# install; the server renders its configs from the very same objects.
from search_rank_client.contract import (ADMISSION_REFUSAL, BYTES, CANDIDATE_IDS, FP32, INT32, INT64,  # noqa: F401
                                         ITEM_IDS, MAX_CANDIDATES, MAX_QUERY_BYTES, QUERY, SCORES, SEARCH_RANK,
                                         TEXT, TEXT_EMBED, TOP_K, USER_ID, Tensor, text_embedding)

# The tokenizer still truncates a query within MAX_QUERY_BYTES to the largest sequence bucket.
# Fixed padded lengths: requests batch in Triton only when shapes match, so the tokenizer pads
# each text to the smallest bucket that holds it.
# 8: with [CLS] and [SEP], 98% of the broad set's search queries are at most 8 tokens, and the
# served encoder runs a query padded to 8 in 2.3 ms against 3.3 ms at 16 (1 ORT thread, measured).
SEQ_BUCKETS = (8, 16, 32, 64, 128)
# ONNX Runtime threads per model instance; this machine class has 2 cores (docs/architecture.md).
DEFAULT_ORT_THREADS = 2


@dataclass(frozen=True)
class QueuePolicy:
    """Admission control on one model's queue (Triton's default_queue_policy, timeout action REJECT).

    An ensemble has no queue of its own: each composing model queues. Under an arrival rate above
    capacity an unbounded queue makes every request slow until callers hit their deadlines; with a
    queue timeout, a request that waited `timeout_us` in a model's queue is answered UNAVAILABLE
    ("Request timeout expired") at once, so admitted requests keep a bounded latency and the rest
    are refused with a retryable code. Measured in docs/reliability.md (`make bench-overload`).

    A timeout rather than a queue length: on this Triton (2.51, python backend) a queue-full
    rejection stalled the whole ensemble (at 3x capacity the server sat 70% idle and served a tenth
    of its capacity), while timeout rejections kept it busy serving at capacity.
    """

    timeout_us: int
    # 0: no length limit; the timeout bounds the queue to about arrival rate x timeout anyway.
    max_queue_size: int = 0

    def __post_init__(self):
        if self.timeout_us < 1:
            raise ValueError(f"timeout_us must be >= 1, got {self.timeout_us}")
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0, got {self.max_queue_size}")


@dataclass(frozen=True)
class DynamicBatching:
    max_queue_delay_us: int = 500
    preferred_batch_size: tuple[int, ...] = ()
    queue: QueuePolicy | None = None


@dataclass(frozen=True)
class Model:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    # Module under model_repository/backends that implements a python-backend model.
    backend_module: str
    max_batch_size: int = 0
    dynamic_batching: DynamicBatching | None = None
    instance_count: int = 1
    parameters: dict[str, str] = field(default_factory=dict)
    # "python" (a module under model_repository/backends) or "tensorrt_plan" (GPU target only).
    platform: str = "python"
    # Inputs whose per-request shapes may differ inside one dynamic batch (Triton allow_ragged_batch).
    ragged_inputs: tuple[str, ...] = ()

    def tensor(self, name: str) -> Tensor:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"model {self.name!r} has no tensor {name!r}")


@dataclass(frozen=True)
class Step:
    model: str
    # model tensor name -> ensemble tensor name
    input_map: dict[str, str]
    output_map: dict[str, str]


@dataclass(frozen=True)
class Ensemble:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class PipelineSpec:
    models: tuple[Model, ...]
    ensembles: tuple[Ensemble, ...]
    target: str = "cpu"

    def model(self, name: str) -> Model:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model named {name!r}")

    def ensemble(self, name: str) -> Ensemble:
        for e in self.ensembles:
            if e.name == name:
                return e
        raise KeyError(f"no ensemble named {name!r}")


# ---- composing models -----------------------------------------------------------------------
# Every crossing into a python-backend model costs about a millisecond of CPU whatever work it
# carries (docs/architecture.md), so the CPU rendering has two: one that tokenizes and encodes, one
# that validates, reads the catalog rows, scores and keeps the top K. The GPU rendering splits the
# first so that the encoder's FLOPs run in a TensorRT plan: tokenizer (python) -> query_encoder
# (TensorRT) -> ranker (python).
TOKENIZER = "tokenizer"
QUERY_ENCODER = "query_encoder"
RANKER = "ranker"
# The model whose version folder holds the versioned catalog store (model_repository.catalog_store).
CATALOG_MODEL = RANKER

CPU, GPU = "cpu", "gpu"
TARGETS = (CPU, GPU)
PYTHON, TENSORRT = "python", "tensorrt_plan"

# Encoder graph tensors; the ONNX export uses exactly these names so a TensorRT plan built
# from it needs no renaming.
INPUT_IDS = Tensor("INPUT_IDS", INT64, (-1,))
ATTENTION_MASK = Tensor("ATTENTION_MASK", INT64, (-1,))
ENCODER_TEXT = Tensor("TEXT", BYTES, (1,))

# Ranker graph tensors (candidates are the batch axis of the ONNX graph; inside the ranker model
# only, never between models).
# item_bucket: the catalog item id hashed into a bounded table (conversion.ranker_model.item_bucket);
# the cold-start row 0 has 0 in every column, so unknown ids share one learned embedding.
ITEM_FEATURE_COLUMNS = ("category", "brand", "price_bucket", "item_bucket")
USER_FEATURE_COLUMNS = ("user_bucket", "segment")
ITEM_FEATURES = Tensor("ITEM_FEATURES", INT64, (len(ITEM_FEATURE_COLUMNS),))
USER_FEATURES = Tensor("USER_FEATURES", INT64, (len(USER_FEATURE_COLUMNS),))
CLICK_PROB = Tensor("CLICK_PROB", FP32, (1,))


def query_embedding(dim: int) -> Tensor:
    return Tensor("QUERY_EMBEDDING", FP32, (dim,))


def item_embedding(dim: int) -> Tensor:
    return Tensor("ITEM_EMBEDDING", FP32, (dim,))


# 100 ms: at 3x capacity it measured admitted p99 221 ms and refusals p99 237 ms (100 candidates),
# inside the CPU profile's 250 ms p99 target (loadtests/targets.toml). 50, 150 and 250 ms were
# measured too (docs/reliability.md).
DEFAULT_QUEUE_POLICY = QueuePolicy(timeout_us=100_000)

# Batching of the two python models, tuned from the table in docs/architecture.md ("Batching").
# 1000 µs: measured against 0, 500 and 2000 with `make bench-batching` (docs/architecture.md,
# "Batching"): at concurrency 4-16 it fills batches of 4-8 and serves the most requests per second,
# and costs about a millisecond at concurrency 1.
ENCODER_BATCHING = DynamicBatching(max_queue_delay_us=1000)
RANKER_BATCHING = DynamicBatching(max_queue_delay_us=300)
ENCODER_MAX_BATCH = 8
# Requests (not rows) per ranker execution.
RANKER_MAX_REQUESTS = 8
# Candidate rows per ranker ORT call: merged requests are scored in runs of at most this many rows
# (a larger request alone). 8 x 1000 rows in one call cost 0.96 ms per request, runs of 1024 rows
# 0.59 ms, one core (model_repository/backends/scoring.py).
RANKER_ROWS_PER_RUN = 1024


# Two CPU encoder instances (two stubs, one ORT session each). With one, Triton 2.51's batcher for it
# sometimes slept its full 500 ms default wait with every caller's request queued, and they were
# refused at the 100 ms queue timeout: 8 such stalls in 4 x 45 s at concurrency 8, 100 candidates;
# with two, none, and 590-678/s against 547-628/s (at 1000 candidates 432-457 against 417-428/s,
# no stall either way), one core, 2026-12-02 (docs/reliability.md).
CPU_ENCODER_INSTANCES = 2
# Two CPU ranker instances since the query-embedding cache: with most queries answered from the
# cache the ranker is the busy model, and with one instance its batcher stalled the same way
# (216 of 3464 calls refused after 500 ms in 15 s at concurrency 8, 100 candidates); with two,
# none in 15 s at concurrency 4 and 8, at 100 and at 1000 candidates (2026-12-06,
# docs/reliability.md). The catalog is memory-mapped, so the second stub shares its pages.
CPU_RANKER_INSTANCES = 2
# Texts each CPU query encoder instance keeps embeddings of (backends/embedding_cache.py): an
# entry is 384 floats plus the text, under 2 KB, so about 30 MB per instance. Not Triton's response
# cache: Triton 2.51 stores a model's refusals too, without their error (docs/architecture.md).
QUERY_CACHE_ENTRIES = 16384
# The cache's lookups on Triton's metrics endpoint (a python-backend custom counter), labelled by
# model, instance and result ("hit" or "miss"); the benchmarks and the dashboard read it.
CACHE_LOOKUPS_METRIC = "searchrank_embedding_cache_lookups_total"
# ONNX Runtime graph rewrites the CPU query encoder's session skips; none by default. Naming
# "SkipLayerNormFusion" here (or in the rendered config's `ort_disabled_optimizers`) makes the served
# static-INT8 encoder 10% faster on this CPU: ORT 1.32's fused SkipLayerNormalization kernel took about
# 0.23 ms per node at 116 tokens, against about 0.05 ms for the Add and LayerNormalization it
# replaces. It is off because the two evaluations of the INT8 graph round some activations
# differently: 5 of the 435 broad texts move (cosine 0.9965 to 0.9999 between them), so the server
# would no longer return what ONNX Runtime's default session of the same file returns, which is what
# the reference pipeline and a user's own check run. Fidelity to FP32 is the same either way
# (docs/architecture.md).
CPU_ENCODER_DISABLED_OPTIMIZERS: tuple[str, ...] = ()


def build_spec(embedding_dim: int, *, target: str = CPU, encoder_instances: int | None = None,
               ort_threads: int = DEFAULT_ORT_THREADS, query_cache_entries: int = QUERY_CACHE_ENTRIES,
               queue_policy: QueuePolicy | None = DEFAULT_QUEUE_POLICY) -> PipelineSpec:
    """The pipeline for an encoder of `embedding_dim` (384 for all-MiniLM-L6-v2) on `target`.

    `queue_policy` bounds the queue of every model except a TensorRT one (None: unbounded, Triton's
    default): whichever step is the bottleneck (the encoder at 100 candidates, the ranker at 1000)
    must refuse, or its queue grows until callers hit their deadlines (docs/reliability.md)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if query_cache_entries < 0:
        raise ValueError(f"query_cache_entries must be >= 0, got {query_cache_entries}")
    if encoder_instances is None:  # one TensorRT plan per GPU; not measured otherwise
        encoder_instances = CPU_ENCODER_INSTANCES if target == CPU else 1
    emb = text_embedding(embedding_dim)
    q_emb = query_embedding(embedding_dim)
    threads = {"intra_op_num_threads": str(ort_threads)}
    text_params = {"seq_buckets": ",".join(map(str, SEQ_BUCKETS)), "max_query_bytes": str(MAX_QUERY_BYTES)}

    ranker = Model(
        RANKER,
        inputs=(q_emb, USER_ID, CANDIDATE_IDS, TOP_K),
        outputs=(ITEM_IDS, SCORES),
        backend_module="ranker",
        # The batch axis is requests: each brings its own [N] candidates (ragged), and the model
        # scores the rows of a batch's requests in runs of up to RANKER_ROWS_PER_RUN rows, then splits them back.
        max_batch_size=RANKER_MAX_REQUESTS,
        dynamic_batching=dataclasses.replace(RANKER_BATCHING, queue=queue_policy),
        ragged_inputs=(CANDIDATE_IDS.name,),
        # The same on both targets (a GPU pod resizes it to its CPUs: deploy/gpu_pod.py).
        instance_count=CPU_RANKER_INSTANCES,
        parameters={**threads, "max_candidates": str(MAX_CANDIDATES), "max_rows_per_run": str(RANKER_ROWS_PER_RUN)},
    )
    if target == CPU:
        encoder = Model(
            QUERY_ENCODER,
            inputs=(ENCODER_TEXT,),
            outputs=(emb,),
            backend_module="text_encoder",
            # 8, not 64: an execution blocks the instance, and timed-out requests are refused only
            # when the scheduler next looks at the queue. At 3x capacity with 64 (and 16) refusals
            # and admitted calls waited behind long batches (refusals p99 0.7 s, goodput 40-105%);
            # with 8, refusals p99 137 ms, admitted p99 179 ms, goodput 105% (docs/architecture.md).
            max_batch_size=ENCODER_MAX_BATCH,
            dynamic_batching=dataclasses.replace(ENCODER_BATCHING, queue=queue_policy),
            instance_count=encoder_instances,
            # Search traffic repeats its head queries, and a text's embedding depends on the text
            # alone, so each instance answers repeats from its own cache (0 turns it off). Not on
            # the GPU rendering: its encoder is a TensorRT plan fed token ids, and untested there.
            parameters={**threads, **text_params, "cache_entries": str(query_cache_entries),
                        **({"ort_disabled_optimizers": ",".join(CPU_ENCODER_DISABLED_OPTIMIZERS)}
                           if CPU_ENCODER_DISABLED_OPTIMIZERS else {})},
        )
        models = (encoder, ranker)
        encode_steps = (Step(QUERY_ENCODER, {ENCODER_TEXT.name: QUERY.name}, {emb.name: "_query_embedding"}),)
        embed_steps = (Step(QUERY_ENCODER, {ENCODER_TEXT.name: TEXT.name}, {emb.name: emb.name}),)
    else:
        tokenizer = Model(
            TOKENIZER,
            inputs=(ENCODER_TEXT,),
            outputs=(INPUT_IDS, ATTENTION_MASK),
            backend_module="tokenizer",
            max_batch_size=64,
            dynamic_batching=DynamicBatching(max_queue_delay_us=100, queue=queue_policy),
            parameters=text_params,
        )
        encoder = Model(
            QUERY_ENCODER,
            inputs=(INPUT_IDS, ATTENTION_MASK),
            outputs=(emb,),
            backend_module="",
            platform=TENSORRT,
            max_batch_size=64,
            dynamic_batching=ENCODER_BATCHING,
            instance_count=encoder_instances,
        )
        models = (tokenizer, encoder, ranker)
        tokens = {INPUT_IDS.name: "_input_ids", ATTENTION_MASK.name: "_attention_mask"}
        encode_steps = (Step(TOKENIZER, {ENCODER_TEXT.name: QUERY.name}, dict(tokens)),
                        Step(QUERY_ENCODER, dict(tokens), {emb.name: "_query_embedding"}))
        embed_steps = (Step(TOKENIZER, {ENCODER_TEXT.name: TEXT.name}, dict(tokens)),
                       Step(QUERY_ENCODER, dict(tokens), {emb.name: emb.name}))

    search_rank = Ensemble(
        SEARCH_RANK,
        inputs=(QUERY, USER_ID, CANDIDATE_IDS, TOP_K),
        outputs=(ITEM_IDS, SCORES),
        steps=encode_steps + (
            Step(RANKER,
                 {q_emb.name: "_query_embedding", USER_ID.name: USER_ID.name,
                  CANDIDATE_IDS.name: CANDIDATE_IDS.name, TOP_K.name: TOP_K.name},
                 {ITEM_IDS.name: ITEM_IDS.name, SCORES.name: SCORES.name}),
        ),
    )
    text_embed = Ensemble(TEXT_EMBED, inputs=(TEXT,), outputs=(emb,), steps=embed_steps)
    return PipelineSpec(models=models, ensembles=(search_rank, text_embed), target=target)
