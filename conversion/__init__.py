"""Offline stages: checkpoints and click logs in, serving artifacts out.

Numbered stages, each cached on a hash of its settings (see `conversion.stages`):
  01 export_encoder   HF BERT-family checkpoint -> ONNX encoder (+ tokenizer)
  02 catalog_generator synthetic catalog, users and click logs with a known ground truth
  03 prune_encoder     structured pruning + distillation of the encoder
  04 compress_encoder  pruned ONNX, ORT INT8 (served) and Q/DQ for TensorRT
  05 catalog_artifact  item text embeddings + item/user feature tables for serving
  06 train_ranker      DCN-v2 CTR ranker trained on the click logs, pruned -> ONNX (FP32, served, Q/DQ)
`python -m conversion.build_models` runs them in order.
"""
