"""Proxy-tuning: decode a large base as if it were tuned, from a small tuned expert and its untuned anti-expert."""
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# `${project_root:}` in conf/ (presets and tasks of the embedded tiny family live under the project)
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
