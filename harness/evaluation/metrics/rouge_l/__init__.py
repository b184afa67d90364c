"""ROUGE-L as MiniLLM computes it; ``rouge_l.py`` is the `evaluate` module, ``rouge_core.py`` the pure code."""
