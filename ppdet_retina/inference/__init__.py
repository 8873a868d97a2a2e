"""Running a trained model: the engines (dygraph, Paddle Inference fp32 / bf16), evaluation, prediction."""
