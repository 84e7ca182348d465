"""Offline lm-evaluation-harness tasks shipped with tst-titan (YAML + local jsonl, no hub).

``tst_heldout``: held-out chunks of the embedded stdlib corpus, scored as rolling
log-likelihood (word/byte perplexity, bits per byte). ``tst_tiny_mc``: eight
multiple-choice questions about Python. ``tst_titan.lm_eval`` adds this folder to
lm-eval's task paths; ``local_data.py`` builds the datasets from the jsonl files.
"""
