"""One small model for an expert that is a LoRA adapter over its own anti-expert.

Every forward runs the batch twice in one call, the adapter on for the first half and off for the
second (PEFT's mixed-adapter batches), and returns both halves' logits side by side, (B, L, 2V).
The engine splits them (`SteeringPair.shared`). One small model's memory instead of two, one forward
call instead of two; in speculative decoding the drafting forward also yields the anti-expert's
logits at every drafted position, so the anti-expert needs no verify forward at all.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from core.errors import UserError
from proxy.streams import cache_argument

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class SharedLoraPair(torch.nn.Module):
    batch_copies = 2  # its cache holds every row twice: adapter on, then adapter off

    def __init__(self, peft_model, adapter_name: str | None = None):
        super().__init__()
        if not hasattr(peft_model, "peft_config"):
            raise UserError("a shared expert/anti-expert pair needs an unmerged LoRA adapter (a PEFT model)")
        self.model = peft_model
        self.adapter = adapter_name or peft_model.active_adapter
        self.config = peft_model.get_base_model().config
        self.cache_argument = cache_argument(peft_model)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_base_model().get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True, logits_to_keep=0):
        rows = input_ids.shape[0]

        def twice(t):
            if isinstance(t, dict):  # one mask per attention kind
                return {kind: twice(mask) for kind, mask in t.items()}
            return None if t is None else torch.cat([t, t], 0)

        out = self.model(
            input_ids=twice(input_ids), attention_mask=twice(attention_mask), position_ids=twice(position_ids),
            use_cache=use_cache, logits_to_keep=logits_to_keep, **{self.cache_argument: cache},
            adapter_names=[self.adapter] * rows + [BASE_ADAPTER] * rows,
        )
        return SimpleNamespace(logits=torch.cat([out.logits[:rows], out.logits[rows:]], dim=-1))


def check_adapter_folder(adapter_path: str) -> Path:
    folder = Path(adapter_path)
    if folder.is_dir() and not (folder / "adapter_config.json").exists():
        raise UserError(f"'{adapter_path}' holds no LoRA adapter (adapter_config.json); proxy.shared_pair needs an "
                        "expert trained with peft=lora and training.merge=false")
    return folder


def load_shared_pair(adapter_path: str, device_map=None) -> SharedLoraPair:
    """Load an unmerged LoRA checkpoint folder (adapter_config.json beside the adapter) as a shared pair,
    placed as an expert is (core.placement)."""
    from peft import AutoPeftModelForCausalLM

    from core.placement import Machine, decoding_device_map

    check_adapter_folder(adapter_path)
    kwargs = {}
    device_map = decoding_device_map("expert", device_map, Machine.here())
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_path, **kwargs).eval()
    model.requires_grad_(False)
    return SharedLoraPair(model)


def adapter_base(adapter_path: str) -> str:
    """The model the adapter was trained on: in a shared pair, the anti-expert."""
    return json.loads((check_adapter_folder(adapter_path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def adapter_tokenizer(adapter_path: str):
    """The tokenizer saved beside the adapter, else that of the model the adapter was trained on."""
    from core.loading import load_tokenizer

    folder = check_adapter_folder(adapter_path)
    if folder.is_dir() and not any((folder / name).exists()
                                   for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return load_tokenizer(adapter_base(adapter_path))
    return load_tokenizer(adapter_path)
