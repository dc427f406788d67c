"""Adapters that move weights in and out of evolm: Hugging Face folders (``hf``), GGUF files (``gguf``)."""
