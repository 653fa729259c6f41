"""MiniMax-VL-01: vision tower, processor, and the VL model."""
