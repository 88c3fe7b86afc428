"""Evaluators (docs/methods.md §6): FID-50K (``fid``, ``features``), GenEval (``geneval`` rule engine and layout,
``detectors`` Mask2Former + CLIP, ``shapes_detector`` for the shapes suite) and step sweeps (``sweep``).

Submodules are imported on use: the heavy libraries (transformers, open_clip, torch-fidelity) load
only when their evaluator runs.
"""
