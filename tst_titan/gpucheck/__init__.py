"""The GPU check kit: every CUDA path of tst-titan on one GPU, in one command.

``scripts/gpu_check.sh`` installs what is missing, then ``scripts/gpu_check.py`` (a thin
command line over :mod:`tst_titan.gpucheck.kit`) runs each row in its own process with a
time budget. The modules, one concern each:

- :mod:`~tst_titan.gpucheck.criteria`, :mod:`~tst_titan.gpucheck.run_criteria`: each row's
  settings and thresholds as named numbers; the prose criteria and the pass/fail checks
  are both made from them (nothing here runs anything).
- :mod:`~tst_titan.gpucheck.rows`: the table of rows (name, budget, spec, what runs).
- :mod:`~tst_titan.gpucheck.preflight`, :mod:`~tst_titan.gpucheck.benches`,
  :mod:`~tst_titan.gpucheck.training`, :mod:`~tst_titan.gpucheck.memory_row`: what each
  row measures.
- :mod:`~tst_titan.gpucheck.runs`: launching training runs and reading what they wrote.
- :mod:`~tst_titan.gpucheck.launch`: ``python -m tst_titan.train`` plus the check's
  switches (ranks sharing one GPU, extra flavors, per-step peak memory).
- :mod:`~tst_titan.gpucheck.report`, :mod:`~tst_titan.gpucheck.kit`: the report and the driver.
"""
