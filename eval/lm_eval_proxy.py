"""The proxy-tuned model as an lm-evaluation-harness model type, `proxy`.

    python -m eval.lm_eval_cli --model proxy \
        --model_args base=llama2-70b,expert=tulu-7b,alpha=1.0 --tasks arc_easy,gsm8k

`eval.lm_eval_cli` imports this module (which registers `proxy`) and then runs lm-eval's own CLI;
the plain `lm_eval` command does not look for models in other packages. From Python:

    import eval.lm_eval_proxy, lm_eval
    lm_eval.simple_evaluate(model="proxy", model_args="base=...,expert=...", tasks=[...])

Model arguments: base, expert, anti_expert (default: the expert's card), alpha, expert_format,
batch_size, max_length (the context used for rolling windows and prompt truncation; default: the
smallest context of the loaded models), and per-role loading options `<role>_<option>` with role
base/expert/anti_expert and option dtype/quantization/device_map/attn_implementation
(e.g. base_quantization=nf4,expert_dtype=bfloat16); dtype=... and device_map=... set all roles.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import lm_eval.models  # noqa: F401  registers lm-eval's own model types first (it skips that once any exists)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from omegaconf import OmegaConf
from tqdm import tqdm

from proxy.engine import GenerationSettings, ProxyEngine
from proxy.errors import UserError

ROLES = ("anti_expert", "expert", "base")  # anti_expert first: "anti_expert_dtype" also ends in "expert_dtype"
LOAD_OPTIONS = ("dtype", "quantization", "device_map", "attn_implementation")


def load_overrides(kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`base_dtype=bfloat16`-style model arguments -> {role: {option: value}}; unknown names are refused."""
    load: dict[str, dict[str, Any]] = {role: dict.fromkeys(LOAD_OPTIONS) for role in ROLES}
    for opt in ("dtype", "device_map"):  # shorthands for every role
        if opt in kwargs:
            value = kwargs.pop(opt)
            for role in ROLES:
                load[role][opt] = value
    for key in list(kwargs):
        for role in ROLES:
            opt = key[len(role) + 1:]
            if key.startswith(role + "_") and opt in LOAD_OPTIONS:
                load[role][opt] = kwargs.pop(key)
                break
    if kwargs:
        raise UserError(
            f"unknown proxy model argument(s) {sorted(kwargs)}; known: base, expert, anti_expert, alpha, "
            "expert_format, batch_size, max_length, dtype, device_map, <role>_<option> with option in "
            f"{', '.join(LOAD_OPTIONS)}"
        )
    return load


@register_model("proxy")
class ProxyLM(LM):
    """lm-eval's three request types answered by a `ProxyEngine`."""

    def __init__(
        self,
        base: str = "tiny-large",
        expert: str | None = None,
        anti_expert: str | None = None,
        alpha: float = 1.0,
        expert_format: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        engine: ProxyEngine | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)  # lm-eval passes these to every model type
        device = kwargs.pop("device", None)
        if engine is None:
            from proxy.run import build_engine

            load = load_overrides(kwargs)
            # lm-eval's CLI always passes a device (cuda:0 unless told); it matters only where CUDA is
            if device and device != "cpu" and torch.cuda.is_available() and not any(v["device_map"] for v in load.values()):
                for role in ROLES:
                    load[role]["device_map"] = device
            cfg = OmegaConf.create({
                "base": str(base), "expert": expert, "anti_expert": anti_expert, "load": load,
                "proxy": {"alpha": alpha, "expert_format": expert_format, "extra_pairs": []},
            })
            engine, _ = build_engine(cfg)
        elif kwargs:
            load_overrides(kwargs)  # refuses unknown names
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> a fixed default
        limits = [engine._context_limit(m) for m in engine._stream_plan()[0].values()]
        known = [n for n in limits if n]
        self.max_length = int(max_length) if max_length else (min(known) if known else 2048)

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "proxy").replace("/", "__")

    def _prefix_text(self) -> str:
        """What an empty context becomes: the BOS (or EOS) token, so that the first token has a condition."""
        token = self.tokenizer.bos_token or self.tokenizer.eos_token
        if token is None:
            raise UserError("the base tokenizer has neither a BOS nor an EOS token to condition on")
        return token

    def _context(self, context: str) -> str:
        return context if self.tokenizer(context)["input_ids"] else self._prefix_text()

    # -- requests ---------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        contexts = [self._context(r.args[0]) for r in requests]
        continuations = [r.args[1] for r in requests]
        out = []
        for i in tqdm(range(0, len(requests), self.batch_size), disable=disable_tqdm, desc="proxy loglikelihood"):
            scored = self.engine.score(contexts[i:i + self.batch_size], continuations[i:i + self.batch_size],
                                       batch_size=self.batch_size)
            for req, s in zip(requests[i:i + self.batch_size], scored):
                answer = (s["logprob"], s["is_greedy"])
                self.cache_hook.add_partial("loglikelihood", req.args, answer)
                out.append(answer)
        return out

    def rolling_windows(self, text: str) -> list[tuple[str, str]]:
        """(context, continuation) strings covering `text` once, each at most max_length tokens.

        A text that fits is one pair (BOS/EOS, text), scored exactly; a longer one is cut into token
        windows as lm-eval's HF model does, decoded back to strings for `ProxyEngine.score`.
        """
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < self.max_length:
            return [(self._prefix_text(), text)]
        prefix_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token else self.tokenizer.eos_token_id
        pairs = []
        for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                ids, prefix_token=prefix_id, max_seq_len=self.max_length - 1, context_len=1)):
            ctx_text = self.tokenizer.decode(ctx) if ctx != [prefix_id] else self._prefix_text()
            pairs.append((ctx_text, self.tokenizer.decode(pred)))
        return pairs

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="proxy loglikelihood_rolling"):
            windows = self.rolling_windows(req.args[0])
            scored = self.engine.score([c for c, _ in windows], [p for _, p in windows], batch_size=self.batch_size)
            total = sum(s["logprob"] for s in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out

    def _fit_prompt(self, context: str, max_new_tokens: int) -> str:
        """Keep the end of a context too long for the model's window (as lm-eval's HF model does)."""
        room = self.max_length - max_new_tokens
        if room < 1:
            raise UserError(f"max_gen_toks={max_new_tokens} leaves no room in a context of {self.max_length} tokens")
        ids = self.tokenizer(context)["input_ids"]
        return context if len(ids) <= room else self.tokenizer.decode(ids[-room:], skip_special_tokens=True)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)  # requests with the same gen_kwargs run as batches
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="proxy generate_until")
        for indices in groups.values():
            settings = self.settings(requests[indices[0]].args[1])
            prompts = [self._fit_prompt(self._context(requests[i].args[0]), settings.max_new_tokens) for i in indices]
            for i, gen in zip(indices, self.engine.generate(prompts, settings)):
                text = gen.text
                for stop in settings.stop:  # a stop string can end inside the last token
                    text = text.split(stop)[0]
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                out[i] = text
                bar.update(1)
        bar.close()
        return out  # type: ignore[return-value]

    def settings(self, gen_kwargs: dict[str, Any]) -> GenerationSettings:
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", 256)))
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        do_sample = bool(kw.pop("do_sample", False)) and temperature > 0
        return GenerationSettings(
            max_new_tokens=max_new, do_sample=do_sample, temperature=temperature if do_sample else 1.0,
            top_k=kw.pop("top_k", None), top_p=kw.pop("top_p", None), seed=kw.pop("seed", 0),
            stop=[s for s in until if s], batch_size=self.batch_size,
        )
