"""HuggingFace -> TensorRT-LLM checkpoint converter: a conversion is a plan before it is data."""
