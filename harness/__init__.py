"""DistillBench: which distillation objective should I use, and what does it cost?"""

__version__ = "0.1.0"
