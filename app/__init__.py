"""Tailor: fine-tune a small LLM on your own PC and keep a library of persona adapters."""

__version__ = "0.1.0"
