"""Files on disk: checkpoints (atomic saves, commit records, resume), PaddleDetection parameter names, the download cache."""
