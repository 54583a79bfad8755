"""What every stage stands on: errors, files, jobs, tracking, the registry, model loading and placement.

The packages depend one way: `core` <- `training`, `core` <- `proxy`, and `eval` on all three; `scripts`
on anything. Nothing in `core` imports a sibling package.
"""
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"

# `${project_root:}` in conf/ (presets and tasks of the embedded tiny family live under the project)
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
