"""The benchmark harness, shared by ``run.py``, the pytest-benchmark files and ``gpu_check.py``.

``timing``   interleaved and repeated timers (CUDA events on GPU), peak-memory probes, cache rotation.
``env``      device name and slug, git commit, versions.
``record``   run settings, rows and skips, the fastcl backends a row is timed for.
``report``   the results JSON, the append-only ``history.jsonl``, the README's markdown.
``plots``    speedup-vs-size PNGs.
``checks``   correctness-check records and fault injection for ``gpu_check.py``.

Import the submodule you need: this package imports nothing, so the renderers stay free of torch.
"""
