"""Load a model and its tokenizer from a preset, a local folder or a hub id, with its own dtype,
device map and optional bitsandbytes quantization."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import OmegaConf

from core import CONF_DIR
from core.errors import UserError
from core.placement import (
    Machine,
    compute_dtype,
    decoding_device_map,
    training_device_map,
)

PRESET_DIR = CONF_DIR / "presets"
QUANTIZATIONS = (None, "nf4", "fp4", "int8")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to load it. `path` is a hub id or a local folder."""

    path: str
    dtype: str = "auto"
    device_map: str | None = None
    quantization: str | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "ModelSpec":
        known = {f.name for f in fields(self)}
        given = {k: v for k, v in dict(overrides or {}).items() if v is not None}
        unknown = sorted(set(given) - known)
        if unknown:
            raise UserError(f"unknown model option(s) {unknown}; known: {sorted(known)}")
        return replace(self, **given)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset(name: str) -> dict[str, Any] | None:
    """A preset's settings (conf/presets/<name>.yaml), or None if `name` is not a preset."""
    path = PRESET_DIR / f"{name}.yaml"
    if "/" in name or not path.exists():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def resolve_spec(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> ModelSpec:
    """A preset name from conf/presets/ (e.g. `llama2-13b`), a registered checkpoint name, a local
    folder, or a hub id."""
    if not name_or_path or str(name_or_path) in ("???", "None"):
        raise UserError("no model given: pass a preset name, a local checkpoint folder or a hub id")
    name_or_path = str(name_or_path)
    data = preset(name_or_path)
    if data is not None:
        spec = ModelSpec(**{k: v for k, v in data.items() if k in {f.name for f in fields(ModelSpec)}})
    elif not Path(name_or_path).expanduser().exists():
        from core.registry import resolve

        spec = ModelSpec(path=resolve(name_or_path)[0])  # a registered name becomes its folder; else as given
    else:
        spec = ModelSpec(path=str(Path(name_or_path).expanduser()))
    return spec.with_overrides(overrides)


def model_paths(*names: str | None) -> list[str]:
    """Where each named model lives (a preset's or registered name's folder or hub id; a path as given):
    what a job's inputs digest reads."""
    return [resolve_spec(str(n)).path for n in names if n]


def looks_local(path: str) -> bool:
    """A path the user meant as a folder: it exists, or it is written as a filesystem path."""
    p = Path(path).expanduser()
    return p.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1


def check_spec(spec: ModelSpec) -> None:
    """Refuse, before any loading, what cannot work here."""
    if looks_local(spec.path) and not Path(spec.path).expanduser().is_dir():
        raise UserError(
            f"checkpoint path '{spec.path}' does not exist; give an existing model folder, "
            f"a hub id such as 'meta-llama/Llama-2-7b-hf', or a preset ({', '.join(preset_names())})"
        )
    if spec.quantization not in QUANTIZATIONS:
        raise UserError(f"unknown quantization '{spec.quantization}'; choose one of nf4, fp4, int8 or null")
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        wants_gpu = []
        if spec.device_map and ("cuda" in str(spec.device_map) or str(spec.device_map).isdigit()):
            wants_gpu.append(f"device_map={spec.device_map}")
        if spec.attn_implementation == "flash_attention_2":
            wants_gpu.append("attn_implementation=flash_attention_2")
        if spec.quantization == "int8":
            wants_gpu.append("quantization=int8 (bitsandbytes 8-bit needs CUDA; nf4 runs on the CPU)")
        if wants_gpu:
            raise UserError(
                f"{', '.join(wants_gpu)} needs a CUDA GPU and none is visible here; "
                "drop the option or run on a GPU machine"
            )


def torch_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    try:
        dtype = getattr(torch, str(name))
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"unknown dtype '{name}'; use auto, float32, bfloat16 or float16")
    return dtype


def quantization_config(spec: ModelSpec, machine: Machine):
    if spec.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quantization,
        bnb_4bit_compute_dtype=compute_dtype(torch_dtype(spec.dtype), machine),
        bnb_4bit_use_double_quant=True,
    )


def _hub_error(spec: ModelSpec, what: str, err: Exception) -> UserError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"cannot load the {what} of '{spec.path}': {first_line}")


def load_tokenizer(spec: ModelSpec | str):
    from transformers import AutoTokenizer

    spec = spec if isinstance(spec, ModelSpec) else resolve_spec(spec)
    check_spec(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(spec, "tokenizer", err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec | str, *, for_training: bool = False, role: str = "base",
               machine: Machine | None = None):
    """Load a causal LM for decoding in `role` (base, expert or anti_expert: eval mode, no grad, placed by
    `core.placement`) or, with for_training, as it is, for the Trainer to place."""
    from transformers import AutoModelForCausalLM

    spec = spec if isinstance(spec, ModelSpec) else resolve_spec(spec)
    check_spec(spec)
    machine = machine or Machine.here()
    kwargs: dict[str, Any] = {"dtype": torch_dtype(spec.dtype), "trust_remote_code": spec.trust_remote_code}
    quant = quantization_config(spec, machine)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if for_training:
        device_map = training_device_map(spec.device_map, quant is not None, machine)
    else:
        device_map = decoding_device_map(role, spec.device_map, machine)
    if device_map is None and quant is not None:
        device_map = "cpu"  # bitsandbytes places what it quantizes
    if device_map is not None:
        kwargs["device_map"] = device_map
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error(spec, "model", err) from None
    if not for_training:
        model.eval()
        model.requires_grad_(False)
    return model
