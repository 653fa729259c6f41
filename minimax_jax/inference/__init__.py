"""Inference: the sampling engine, the memory planner, tokenizer and chat."""
