"""Data: the registry of data sources (``sources``), their corpora (``embedded``,
``pycorpus``, ``local``), the token store's format (``store``) and its preparation
(``prepare``, ``parts``), tokenizers, and the phase-aware packing dataloader (``loader``)."""
