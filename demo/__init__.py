"""The demo: a synthetic world of fictional people, a tiny model family pretrained on it, and the job
(`make demo`, `python -m demo`) that proxy-tunes the family's large base with its small one.

Not part of the library (pyproject.toml ships core, training, proxy and eval): the demo, its probe and
the benchmarks use it, and it uses the library the way a user does.
"""
