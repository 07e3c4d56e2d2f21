"""The encoder compression report: FP32 vs pruned vs pruned+INT8 (CPU) vs pruned+Q/DQ, one run.

Every number comes from the ONNX files as served (ORT CPU, the serving session options, the
serving tokenizer's buckets), measured in the same process so the ratios compare like with
like. Fidelity is cosine to the FP32 teacher and how many of the teacher's top-10 title
neighbours of each query the compressed encoder also returns, on two sets:

- "broad": text from outside the catalog generator (conversion/broad_text.py, or a user's
  `--eval-texts FILE`). The fidelity targets are judged here, for the served INT8 graph and
  the TensorRT Q/DQ graph alike.
- "catalog held-out": the generator's own titles and queries that pruning, distillation and
  calibration never saw. In-distribution, so it flatters compression; reported, never gating.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from conversion.broad_text import EvalTexts, load_eval_texts
from conversion.catalog_generator import Catalog, CatalogSettings, build_catalog
from conversion.compress_encoder import CALIBRATION_TEXTS, PRUNED_ONNX, QDQ_ONNX, CompressSettings
from conversion.export_encoder import ENCODER_ONNX, TOKENIZER_JSON
from conversion.prune_encoder import split_texts
from model_repository import spec
from model_repository.runtime import BucketTokenizer, encode_texts, ort_session

log = logging.getLogger(__name__)

REPORT_JSON = "encoder_compression.json"
TARGETS = {"throughput_ratio_32x32": 4.0, "latency_ratio_1x16": 2.0, "mean_cosine": 0.98, "top10_overlap": 0.9}
THREADS = 2
INT8, QDQ = "pruned+int8 (ORT CPU)", "pruned+qdq (TensorRT)"
BROAD, CATALOG = "broad", "catalog_heldout"
SET_LABELS = {BROAD: "broad (gates)", CATALOG: "catalog held-out (in-distribution, reported only)"}
FIDELITY = ("mean_cosine", "top10_overlap")
# Both quantized graphs face the fidelity gate: CPU serves the INT8 one, GPU nodes build their
# TensorRT engine from the Q/DQ one (scored here in ORT on CPU, before any engine exists).
GATED = {INT8: "", QDQ: "qdq_"}


def variants(fp32_dir: Path, compressed_dir: Path) -> dict[str, Path]:
    return {"fp32": fp32_dir / ENCODER_ONNX, "pruned": compressed_dir / PRUNED_ONNX,
            INT8: compressed_dir / ENCODER_ONNX, QDQ: compressed_dir / QDQ_ONNX}


# The unpruned SmoothQuant INT8 candidate (conversion.served_encoder), when the gate tried it.
UNPRUNED_INT8, UNPRUNED_QDQ = "unpruned+smoothquant int8 (ORT CPU)", "unpruned+smoothquant qdq (TensorRT)"
UNPRUNED_DYNAMIC = "fp32+dynamic int8, unpruned (comparison)"
UNPRUNED_STATIC = "fp32+static int8, unpruned (comparison)"


def unpruned_int8(fp32_dir: Path, compressed_dir: Path, out_dir: Path) -> dict[str, Path]:
    """The unpruned FP32 export quantized two ways, for comparison rows (never served by this report):
    dynamic MatMul per-channel INT8 with reduce-range (portable to AVX2 hosts), and static INT8 with
    the served encoder's own settings and calibration texts. What a gate that may fall back to
    unpruned INT8 would choose between."""
    from conversion.quantize import OrtInt8Settings, encoder_calibration_feeds, quantize_ort_int8

    out_dir.mkdir(parents=True, exist_ok=True)
    served = CompressSettings().ort_int8
    dynamic = OrtInt8Settings(mode="dynamic", per_channel=True, op_types=("MatMul",), reduce_range=True)
    texts = json.loads((compressed_dir / CALIBRATION_TEXTS).read_text())
    feeds = encoder_calibration_feeds(fp32_dir / TOKENIZER_JSON, texts)
    paths = {UNPRUNED_DYNAMIC: out_dir / "encoder.unpruned-dynamic.onnx",
             UNPRUNED_STATIC: out_dir / "encoder.unpruned-static.onnx"}
    quantize_ort_int8(fp32_dir / ENCODER_ONNX, paths[UNPRUNED_DYNAMIC], dynamic)
    quantize_ort_int8(fp32_dir / ENCODER_ONNX, paths[UNPRUNED_STATIC], served, feeds)
    return paths


def _feeds(tok: BucketTokenizer, texts: Sequence[str], width: int) -> dict[str, np.ndarray]:
    ids, mask = tok.encode(texts)
    if ids.shape[1] != width:
        raise ValueError(f"texts fill bucket {ids.shape[1]}, not {width}")
    return {spec.INPUT_IDS.name: ids, spec.ATTENTION_MASK.name: mask}


def _median_seconds(session, feeds: dict, runs: int) -> float:
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure_speed(paths: dict[str, Path], tok: BucketTokenizer, queries: Sequence[str], titles: Sequence[str],
                  rounds: int = 3, runs_1x16: int = 100, runs_32x32: int = 10) -> dict[str, dict]:
    """Median latency at 1x16 and throughput at 32x32; variants interleaved, best round kept.

    Interleaving and keeping each variant's best round means a burst of load from elsewhere on
    a shared machine penalises one round, not one variant.
    """
    one = _feeds(tok, [next(q for q in queries if 8 < len(tok._tok.encode(q).ids) <= 16)], 16)
    long_titles = [t for t in titles if 16 < len(tok._tok.encode(t).ids) <= 32]
    if len(long_titles) < 32:  # catalog titles are short; repeat words to fill the 32-token bucket
        long_titles = [f"{t} {t}" for t in titles if 16 < len(tok._tok.encode(f"{t} {t}").ids) <= 32]
    batch = _feeds(tok, long_titles[:32], 32)
    sessions = {name: ort_session(p, threads=THREADS) for name, p in paths.items()}
    best: dict[str, dict] = {n: {"latency_1x16_ms": float("inf"), "throughput_32x32": 0.0} for n in paths}
    for _ in tqdm(range(rounds), desc="timing rounds"):
        for name, session in sessions.items():
            lat = _median_seconds(session, one, runs_1x16) * 1e3
            thr = 32 / _median_seconds(session, batch, runs_32x32)
            best[name]["latency_1x16_ms"] = min(best[name]["latency_1x16_ms"], lat)
            best[name]["throughput_32x32"] = max(best[name]["throughput_32x32"], thr)
    return best


def top_k_overlap(q_ref: np.ndarray, c_ref: np.ndarray, q: np.ndarray, c: np.ndarray, k: int = 10) -> float:
    ref = np.argsort(-(q_ref @ c_ref.T), axis=1)[:, :k]
    got = np.argsort(-(q @ c.T), axis=1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref, got)]))


def fidelity(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> dict:
    """Cosine over every query and title, and query -> title top-10 overlap, against the reference."""
    (ref_q, ref_t), (q, t) = ref, got
    cos = np.concatenate([(q * ref_q).sum(1), (t * ref_t).sum(1)])
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "top10_overlap": top_k_overlap(ref_q, ref_t, q, t)}


def measure_fidelity(paths: dict[str, Path], tok: BucketTokenizer,
                     text_sets: dict[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, dict[str, dict]]:
    """{variant: {set name: fidelity}} against the "fp32" variant; text_sets: {name: (queries, titles)}."""
    emb: dict[str, dict[str, tuple]] = {}
    for name, path in tqdm(paths.items(), desc="fidelity embeddings"):
        session = ort_session(path, threads=THREADS)
        emb[name] = {s: (encode_texts(tok, session, q), encode_texts(tok, session, t))
                     for s, (q, t) in text_sets.items()}
    return {name: {s: fidelity(emb["fp32"][s], e) for s, e in sets.items()} for name, sets in emb.items()}


def targets(rows: dict[str, dict], served: tuple[str, str] = (INT8, QDQ)) -> dict[str, dict]:
    """Each target with its value and verdict, for the served variant (its INT8 graph, its Q/DQ graph);
    fidelity values are the broad set's, the catalog's ride beside."""
    base, int8 = rows["fp32"], rows[served[0]]
    out = {"throughput_ratio_32x32": {"variant": served[0],
                                      "value": int8["throughput_32x32"] / base["throughput_32x32"]},
           "latency_ratio_1x16": {"variant": served[0], "value": base["latency_1x16_ms"] / int8["latency_1x16_ms"]}}
    for variant, prefix in zip(served, GATED.values()):
        f = rows[variant]["fidelity"]
        for metric in FIDELITY:
            out[prefix + metric] = {"variant": variant, "set": BROAD, "value": f[BROAD][metric],
                                    "catalog_heldout": f[CATALOG][metric]}
    for key, t in out.items():
        t["target"] = TARGETS[key.removeprefix("qdq_")]
        t["pass"] = t["value"] >= t["target"]
    return out


def build_report(fp32_dir: Path, compressed_dir: Path, catalog: CatalogSettings, rounds: int = 3,
                 eval_texts: EvalTexts | None = None, unpruned_dir: Path | None = None,
                 served_dir: Path | None = None, selection: dict | None = None) -> dict:
    """eval_texts: the broad set the gate judges (default: the bundled one, conversion/broad_text.py).
    unpruned_dir: also quantize the unpruned export there and report it (rows not judged by the targets).
    served_dir: the unpruned SmoothQuant INT8 folder when the gate chose it (its rows are then the ones
    the targets judge); selection: the gate's choice record (conversion.served_encoder), reported."""
    paths = variants(fp32_dir, compressed_dir)
    served = (INT8, QDQ)
    if served_dir is not None and Path(served_dir) != Path(compressed_dir):
        paths.update({UNPRUNED_INT8: Path(served_dir) / ENCODER_ONNX, UNPRUNED_QDQ: Path(served_dir) / QDQ_ONNX})
        served = (UNPRUNED_INT8, UNPRUNED_QDQ)
    if unpruned_dir is not None:
        paths.update(unpruned_int8(fp32_dir, compressed_dir, unpruned_dir))
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"encoder files missing: {', '.join(missing)}")
    broad = eval_texts if eval_texts is not None else load_eval_texts()
    tok = BucketTokenizer(compressed_dir / TOKENIZER_JSON)
    texts = split_texts(Catalog.load(build_catalog(catalog)))
    queries, titles = texts["heldout_queries"], texts["heldout_titles"]
    pruning = json.loads((compressed_dir / "export_report.json").read_text())
    flops, params = pruning["pruning"]["flops"], pruning["pruning"]["parameters"]
    rows = {}
    # Speed depends only on shapes; the catalog text is what fills the 1x16 and 32x32 buckets.
    speed = measure_speed(paths, tok, queries, titles, rounds=rounds)
    fid = measure_fidelity(paths, tok, {BROAD: (broad.queries, broad.titles), CATALOG: (queries, titles)})
    for name, path in paths.items():
        which = ("teacher" if name in ("fp32", UNPRUNED_DYNAMIC, UNPRUNED_STATIC, UNPRUNED_INT8, UNPRUNED_QDQ)
                 else "pruned")
        # The top-level fidelity keys are the gated (broad) set's, so readers of one number
        # (encoder_frontier, dashboards) see what the gate sees.
        rows[name] = {"parameters": params[which], "gflops_seq16": flops["16"][which] / 1e9,
                      "gflops_seq32": flops["32"][which] / 1e9,
                      "size_mb": path.stat().st_size / 2**20, **speed[name], **fid[name][BROAD],
                      "fidelity": fid[name]}
    return {"variants": rows, "targets": targets(rows, served), "served": served[0], "selection": selection,
            "eval": {BROAD: broad.summary(),
                     CATALOG: {"source": f"catalog {catalog} held-out split (conversion.prune_encoder.split_texts)",
                               "queries": len(queries), "titles": len(titles)}},
            "pruning": pruning["pruning"], "int8_settings": pruning["int8"].get("settings", pruning["int8"]),
            "machine": {"cpus": os.cpu_count(), "cpu": _cpu_name(), "cpu_flags": _cpu_flags(),
                        "python": platform.python_version(), "ort_threads": THREADS},
            "date": datetime.date.today().isoformat(),
            "folders": {"fp32": str(fp32_dir), "compressed": str(compressed_dir),
                        "served": str(served_dir or compressed_dir)}}


def _cpu_flags(wanted: Sequence[str] = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")) -> list[str]:
    """The flags that decide INT8 speed (VNNI, AMX), so a reader can tell which kernels ran."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(report: dict, command: str) -> str:
    broad, cat = report["eval"][BROAD], report["eval"][CATALOG]
    overlap = broad["catalog_vocabulary_overlap"]
    lines = ["# Encoder compression report", "",
             f"Generated by `{command}` on {report['date']} "
             f"({report['machine']['cpus']} CPUs, {report['machine']['cpu']}, flags "
             f"{' '.join(report['machine'].get('cpu_flags', [])) or 'n/a'}; ORT CPU, "
             f"{report['machine']['ort_threads']} intra-op threads, serving session options). "
             "Absolute numbers are this machine's; the ratios are the headline.", "",
             "| variant | params (M) | GFLOPs seq16 | GFLOPs seq32 | size MB | latency 1x16 ms | "
             "throughput 32x32 texts/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["variants"].items():
        lines.append(f"| {name} | {r['parameters'] / 1e6:.2f} | {r['gflops_seq16']:.3f} | {r['gflops_seq32']:.3f} | "
                     f"{r['size_mb']:.1f} | {r['latency_1x16_ms']:.2f} | {r['throughput_32x32']:.0f} |")
    lines += ["", "## Fidelity against the FP32 teacher", "",
              f"- **{SET_LABELS[BROAD]}**: {broad['queries']} queries, {broad['titles']} titles from "
              f"{broad['source']} ({broad['provenance']}; sha256 `{broad['sha256'][:16]}`). "
              f"{overlap['share_of_types']:.1%} of its {overlap['word_types']} word types "
              f"({overlap['share_of_running_words']:.1%} of running words) also occur in the catalog generator's "
              f"vocabulary; {len(overlap['texts_naming_a_catalog_category'])} texts name a catalog category.",
              f"- **{SET_LABELS[CATALOG]}**: {cat['queries']} queries, {cat['titles']} titles that pruning, "
              "distillation and calibration never saw, from the same generator they were trained on.",
              "", "Top-10 overlap: each query's 10 nearest titles within the same set, against the teacher's.", "",
              "| variant | broad mean cos | broad min cos | broad top-10 | catalog mean cos | catalog min cos "
              "| catalog top-10 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["variants"].items():
        b, c = r["fidelity"][BROAD], r["fidelity"][CATALOG]
        lines.append(f"| {name} | {b['mean_cosine']:.4f} | {b['min_cosine']:.4f} | {b['top10_overlap']:.3f} | "
                     f"{c['mean_cosine']:.4f} | {c['min_cosine']:.4f} | {c['top10_overlap']:.3f} |")
    lines += ["", "| target | variant | needed | measured (gates) | catalog held-out (not gating) | verdict |",
              "|---|---|---:|---:|---:|---|"]
    for k, t in report["targets"].items():
        cat_value = f"{t['catalog_heldout']:.3f}" if "catalog_heldout" in t else "n/a"
        lines.append(f"| {k} | {t['variant']} | >= {t['target']} | {t['value']:.3f} | {cat_value} | "
                     f"{'PASS' if t['pass'] else 'FAIL'} |")
    lines += selection_markdown(report.get("selection"))
    p = report["pruning"]
    lines += ["", f"Pruned structure: {p['structure']['layers']} layers, heads per layer {p['structure']['heads']}, "
              f"FFN widths {p['structure']['ffn']}; {p['keep_flops_achieved']:.3f} of the teacher's FLOPs at seq 16. "
              f"Distillation: {p['distill']['steps']} steps in {p['distill']['seconds']} s on "
              f"{p['distill']['train_texts']} texts.", "",
              f"ORT INT8 settings: `{json.dumps(report['int8_settings'], default=str)}`.", ""]
    return "\n".join(lines)


def selection_markdown(choice: dict | None) -> list[str]:
    """The gate's choice: every candidate tried (both graphs, both sets), the one served and why."""
    if not choice:
        return []
    gate = choice["gate"]
    lines = ["", "## Served encoder: the fastest candidate that passes the gate", "",
             f"Gate: mean cosine >= {gate['mean_cosine']} and top-10 overlap >= {gate['top10_overlap']} on the "
             f"{gate['set']} set, for the INT8 graph served on CPU and the TensorRT Q/DQ graph (scored in ORT CPU). "
             f"Candidates in speed order: {', '.join(choice['candidates_in_speed_order'])}.", "",
             "| candidate | graph | broad mean cos | broad top-10 | catalog mean cos | catalog top-10 | verdict |",
             "|---|---|---:|---:|---:|---:|---|"]
    for t in choice["tried"]:
        for graph, label in (("int8", "ORT INT8 (encoder.onnx)"), ("qdq", "Q/DQ (encoder.qdq.onnx)")):
            f = t["fidelity"][graph]
            ok = all(f[BROAD][m] >= gate[m] for m in FIDELITY)
            lines.append(f"| {t['candidate']} | {label} | {f[BROAD]['mean_cosine']:.4f} | {f[BROAD]['top10_overlap']:.3f} | "
                         f"{f[CATALOG]['mean_cosine']:.4f} | {f[CATALOG]['top10_overlap']:.3f} | "
                         f"{'PASS' if ok else 'FAIL'} |")
    lines += ["", f"**Served: {choice['chosen']}** (`{choice['folder']}`): {choice['reason']}."]
    return lines


def write_report(report: dict, json_path: Path, md_path: Path | None, command: str) -> None:
    for path, text in ((json_path, json.dumps(report, indent=2, default=str)),
                       (md_path, markdown(report, command) if md_path else None)):
        if path is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversion.encoder_report", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="default", help="build profile whose encoders to compare")
    p.add_argument("--markdown", type=Path, help="also write the markdown table here (e.g. docs/encoder_compression.md)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best kept)")
    p.add_argument("--eval-texts", type=Path,
                   help="UTF-8 file the fidelity gate judges instead of the bundled broad set: one text per "
                        "line, each starting 'query<TAB>' or 'title<TAB>' (at least one query and 20 titles)")
    p.add_argument("--unpruned-int8", action="store_true",
                   help="also quantize the unpruned FP32 export (dynamic and static INT8) and report it beside")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from conversion.build_models import encoder_report

    try:
        report = encoder_report(args.profile, args.markdown, rounds=args.rounds, force=True,
                                eval_texts=args.eval_texts, unpruned=args.unpruned_int8)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
