"""The cloning benchmark of pnc_surgery (BENCHMARK.md): PNC against fine-tuning, LwF, EWC, LoRA and an ensemble.

Not part of the wheel. Run it with ``python -m benchmarks.run`` (``--smoke`` for the one-minute version).
"""
