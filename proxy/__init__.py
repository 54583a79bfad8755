"""Proxy-tuning: decode a large base as if it were tuned, from a small tuned expert and its untuned anti-expert."""
