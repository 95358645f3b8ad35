"""The evidence pipeline: measure speed and quality on this machine, then decide and cost.

    speed.py     one model file's speed through the public API, one process per configuration
    sweep.py     thread sweep, pinned vs unpinned, build presets (llama-bench), as ratios
    roofline.py  memory bandwidth and bytes read per token -> the decode bound
    quality.py   KLD / top-1 agreement / perplexity against a reference, and the llama.cpp check
    tasks.py     per-role task suite (keywords, length, optional semantic similarity)
    tools.py     llama.cpp's own tools built from the same source (bench, perplexity, imatrix)
    results.py   the evidence JSON document
    decide.py    explicit, configurable rules -> a recommendation per role
    cost.py      local vs API cost, break-even volume
    report.py    report.md + Pareto PNG + figures.json, and --compare regressions

Why a package apart from the backends: everything here is plain Python over the public API and
``backends/llama_quality.py``; nothing in the library imports it, so it costs nothing at runtime.
"""
