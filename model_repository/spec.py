"""The pipeline spec: the one place that names models, tensors, dtypes, dims and batching.

Configs (`model_repository.render`), the python-backend models, the ONNX exports and the tests
all read names and shapes from here; nothing else spells a tensor name.

The public contract (DESIGN.md) is the two ensembles `search_rank` and `text_embed`; its names,
dtypes and limits come from `search_rank_client.contract` (the client distribution owns them),
and the composing models behind them may change without clients noticing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# The public contract (tensor names, dtypes, limits) is owned by the client package that services
# install; the server renders its configs from the very same objects.
from search_rank_client.contract import (ADMISSION_REFUSAL, BYTES, CANDIDATE_IDS, FP32, INT32, INT64,  # noqa: F401
                                         ITEM_IDS, MAX_CANDIDATES, MAX_QUERY_BYTES, QUERY, SCORES, SEARCH_RANK,
                                         TEXT, TEXT_EMBED, TOP_K, USER_ID, Tensor, text_embedding)

# The tokenizer still truncates a query within MAX_QUERY_BYTES to the largest sequence bucket.
# Fixed padded lengths: requests batch in Triton only when shapes match, so the tokenizer pads
# each text to the smallest bucket that holds it.
SEQ_BUCKETS = (16, 32, 64, 128)
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
    # Module under model_repository/backends that implements the model on the CPU target.
    backend_module: str
    max_batch_size: int = 0
    dynamic_batching: DynamicBatching | None = None
    instance_count: int = 1
    parameters: dict[str, str] = field(default_factory=dict)

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
TOKENIZER = "tokenizer"
QUERY_ENCODER = "query_encoder"
FEATURE_LOOKUP = "feature_lookup"
CTR_RANKER = "ctr_ranker"
TOP_K_SELECT = "top_k"

# Encoder graph tensors; the ONNX export uses exactly these names so a TensorRT plan built
# from it needs no renaming.
INPUT_IDS = Tensor("INPUT_IDS", INT64, (-1,))
ATTENTION_MASK = Tensor("ATTENTION_MASK", INT64, (-1,))
ENCODER_TEXT = Tensor("TEXT", BYTES, (1,))

# Ranker graph tensors (candidates are the batch axis).
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


def build_spec(embedding_dim: int, *, encoder_instances: int = 1, ort_threads: int = DEFAULT_ORT_THREADS,
               queue_policy: QueuePolicy | None = DEFAULT_QUEUE_POLICY) -> PipelineSpec:
    """The CPU pipeline for an encoder of `embedding_dim` (384 for all-MiniLM-L6-v2).

    `queue_policy` bounds the queue of every model except top_k (None: unbounded, Triton's default).
    top_k is left without one: refusing there would throw away a request whose work is all done."""
    emb = text_embedding(embedding_dim)
    q_emb = query_embedding(embedding_dim)
    i_emb = item_embedding(embedding_dim)
    threads = {"intra_op_num_threads": str(ort_threads)}

    tokenizer = Model(
        TOKENIZER,
        inputs=(ENCODER_TEXT,),
        outputs=(INPUT_IDS, ATTENTION_MASK),
        backend_module="tokenizer",
        max_batch_size=64,
        dynamic_batching=DynamicBatching(max_queue_delay_us=100, queue=queue_policy),
        parameters={"seq_buckets": ",".join(map(str, SEQ_BUCKETS)), "max_query_bytes": str(MAX_QUERY_BYTES)},
    )
    encoder = Model(
        QUERY_ENCODER,
        inputs=(INPUT_IDS, ATTENTION_MASK),
        outputs=(emb,),
        backend_module="encoder",
        max_batch_size=64,
        dynamic_batching=DynamicBatching(max_queue_delay_us=500, queue=queue_policy),
        instance_count=encoder_instances,
        parameters=dict(threads),
    )
    # Non-batching: it receives one request's [N] candidates and validates them, then emits
    # per-candidate rows so the ranker can batch candidates across requests.
    lookup = Model(
        FEATURE_LOOKUP,
        inputs=(
            Tensor(q_emb.name, FP32, (1, embedding_dim)),
            USER_ID,
            CANDIDATE_IDS,
        ),
        outputs=(
            Tensor(q_emb.name, FP32, (-1, embedding_dim)),
            Tensor(i_emb.name, FP32, (-1, embedding_dim)),
            Tensor(ITEM_FEATURES.name, INT64, (-1, ITEM_FEATURES.dims[0])),
            Tensor(USER_FEATURES.name, INT64, (-1, USER_FEATURES.dims[0])),
        ),
        backend_module="feature_lookup",
        # Not batching (max_batch_size 0): the block only gives it a queue with the policy. At 1000
        # candidates it is the slowest step, and without a policy its queue grew to over a second.
        dynamic_batching=DynamicBatching(max_queue_delay_us=0, queue=queue_policy),
        parameters={"max_candidates": str(MAX_CANDIDATES)},
    )
    ranker = Model(
        CTR_RANKER,
        inputs=(q_emb, i_emb, ITEM_FEATURES, USER_FEATURES),
        outputs=(CLICK_PROB,),
        backend_module="ranker",
        # Several full requests (<= MAX_CANDIDATES rows each) merge into one ORT call.
        max_batch_size=4 * MAX_CANDIDATES,
        dynamic_batching=DynamicBatching(max_queue_delay_us=300, queue=queue_policy),
        parameters=dict(threads),
    )
    topk = Model(
        TOP_K_SELECT,
        inputs=(Tensor(CLICK_PROB.name, FP32, (-1, 1)), CANDIDATE_IDS, TOP_K),
        outputs=(ITEM_IDS, SCORES),
        backend_module="top_k",
    )

    search_rank = Ensemble(
        SEARCH_RANK,
        inputs=(QUERY, USER_ID, CANDIDATE_IDS, TOP_K),
        outputs=(ITEM_IDS, SCORES),
        steps=(
            Step(TOKENIZER, {ENCODER_TEXT.name: QUERY.name},
                 {INPUT_IDS.name: "_input_ids", ATTENTION_MASK.name: "_attention_mask"}),
            Step(QUERY_ENCODER, {INPUT_IDS.name: "_input_ids", ATTENTION_MASK.name: "_attention_mask"},
                 {emb.name: "_query_embedding"}),
            Step(FEATURE_LOOKUP,
                 {q_emb.name: "_query_embedding", USER_ID.name: USER_ID.name,
                  CANDIDATE_IDS.name: CANDIDATE_IDS.name},
                 {q_emb.name: "_query_rows", i_emb.name: "_item_rows",
                  ITEM_FEATURES.name: "_item_features", USER_FEATURES.name: "_user_features"}),
            Step(CTR_RANKER,
                 {q_emb.name: "_query_rows", i_emb.name: "_item_rows",
                  ITEM_FEATURES.name: "_item_features", USER_FEATURES.name: "_user_features"},
                 {CLICK_PROB.name: "_click_prob"}),
            Step(TOP_K_SELECT,
                 {CLICK_PROB.name: "_click_prob", CANDIDATE_IDS.name: CANDIDATE_IDS.name, TOP_K.name: TOP_K.name},
                 {ITEM_IDS.name: ITEM_IDS.name, SCORES.name: SCORES.name}),
        ),
    )
    text_embed = Ensemble(
        TEXT_EMBED,
        inputs=(TEXT,),
        outputs=(emb,),
        steps=(
            Step(TOKENIZER, {ENCODER_TEXT.name: TEXT.name},
                 {INPUT_IDS.name: "_input_ids", ATTENTION_MASK.name: "_attention_mask"}),
            Step(QUERY_ENCODER, {INPUT_IDS.name: "_input_ids", ATTENTION_MASK.name: "_attention_mask"},
                 {emb.name: emb.name}),
        ),
    )
    return PipelineSpec(models=(tokenizer, encoder, lookup, ranker, topk), ensembles=(search_rank, text_embed))
