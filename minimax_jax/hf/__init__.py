"""Hugging Face I/O: both config schemas, name mapping, safetensors, Orbax, from/save_pretrained."""
