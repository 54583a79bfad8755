"""Proxy decoding: a large base steered, token by token, by a small tuned expert and its untuned anti-expert."""
import core  # noqa: F401  the `${project_root:}` resolver the presets use
