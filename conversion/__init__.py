"""Offline stages: checkpoints and click logs in, serving artifacts out.

Numbered stages, each cached on a hash of its settings (see `conversion.stages`):
  01 export_encoder   HF BERT-family checkpoint -> ONNX encoder (+ tokenizer)
  02 catalog_generator synthetic catalog, users and click logs with a known ground truth
  03 catalog_artifact  item text embeddings + item/user feature tables for serving
  04 train_ranker      CTR ranker trained on the click logs -> ONNX
`python -m conversion.build_models` runs them in order.
"""
