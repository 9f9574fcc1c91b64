"""Inference runtimes (onnxruntime, ai-edge-litert, tflite-runtime) behind one ``Model`` interface,
and the metadata every model artifact carries (artifact, tflite_meta).
"""
