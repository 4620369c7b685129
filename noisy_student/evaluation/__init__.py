"""Judging models: ImageNet-C style corruptions, robustness suites and their scores (mCE,
ECE, FGSM), the robustness report and figures, pseudo-label diagnostics, and the
statistics every figure carries (intervals, paired tests)."""
