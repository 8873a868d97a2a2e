"""Export for deployment: tracing, Paddle Inference files with infer_cfg.yml, ONNX."""
