"""The demo: a synthetic world of fictional people, a tiny model family pretrained on it, and the job
(`make demo`, `python -m demo`) that proxy-tunes the family's large base with its small one.

Not part of the library (pyproject.toml ships core, training, proxy and eval): the job, its probe and
the benchmarks (which read the family it builds) are all that need it, and it uses the library the way
a user does. What the world's settings measured: docs/tiny-world.md.
"""
