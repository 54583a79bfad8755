"""The proxy-tuned model as an lm-evaluation-harness model type, `proxy`.

    python -m eval.lm_eval_cli --model proxy \
        --model_args base=llama2-70b,expert=tulu-7b,alpha=1.0 --tasks arc_easy,gsm8k

`eval.lm_eval_cli` imports this module (which registers `proxy`) and then runs lm-eval's own CLI;
the plain `lm_eval` command does not look for models in other packages. From Python:

    import eval.lm_eval_proxy, lm_eval
    lm_eval.simple_evaluate(model="proxy", model_args="base=...,expert=...", tasks=[...])

It is lm-eval's `TemplateLM`, so contexts and continuations are split as lm-eval's `hf` model splits
them (trailing spaces move to the continuation, an empty context becomes BOS or EOS), and it tokenizes,
windows, truncates, stops and cuts generations with the `hf` model's own rules and helpers: at alpha 0
it gives the `hf` model's numbers on the same base.

Model arguments: base, expert, anti_expert (default: the expert's card), alpha, expert_format,
batch_size, max_length (the context used for rolling windows and prompt truncation; default: the
smallest context of the loaded models), max_gen_toks (default 256, as `hf`), add_bos_token (as `hf`),
model (the name lm-eval gives the results folder; the CLI wrapper fills it), and per-role loading options
`<role>_<option>` with role base/expert/anti_expert and option dtype/quantization/device_map/
attn_implementation (e.g. base_quantization=nf4,expert_dtype=bfloat16); dtype=... and device_map=...
set all roles. A served base (base=http://HOST:PORT/v1) takes base_model, base_tokenizer, base_top_logprobs,
base_outside, base_api_key_env, base_timeout and base_retries (proxy/remote.py); its loglikelihood needs every
log-probability (base_top_logprobs = the vocabulary), generate_until any K.
"""
from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  registers lm-eval's own model types first (it skips that once any exists)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from omegaconf import OmegaConf
from tqdm import tqdm

from core.errors import UserError
from core.registry import display_name
from proxy.build import SERVED_OPTIONS
from proxy.engine import GenerationSettings, ProxyEngine

ROLES = ("anti_expert", "expert", "base")  # anti_expert first: "anti_expert_dtype" also ends in "expert_dtype"
LOAD_OPTIONS = ("dtype", "quantization", "device_map", "attn_implementation")


def role_options(role: str) -> tuple[str, ...]:
    """What `<role>_<option>` may set: the loading options, and for the base those of a served one."""
    return LOAD_OPTIONS + (SERVED_OPTIONS if role == "base" else ())


def load_overrides(kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`base_dtype=bfloat16`-style model arguments -> {role: {option: value}}; unknown names are refused."""
    load: dict[str, dict[str, Any]] = {role: dict.fromkeys(role_options(role)) for role in ROLES}
    for opt in ("dtype", "device_map"):  # shorthands for every role
        if opt in kwargs:
            value = kwargs.pop(opt)
            for role in ROLES:
                load[role][opt] = value
    for key in list(kwargs):
        for role in ROLES:
            opt = key[len(role) + 1:]
            if key.startswith(role + "_") and opt in role_options(role):
                load[role][opt] = kwargs.pop(key)
                break
    if kwargs:
        raise UserError(
            f"unknown proxy model argument(s) {sorted(kwargs)}; known: base, expert, anti_expert, alpha, "
            "expert_format, plausibility, cross_candidates, batch_size, max_length, max_gen_toks, add_bos_token, "
            "model, dtype, device_map, "
            f"<role>_<option> with option in {', '.join(LOAD_OPTIONS)}, and for a served base (base=http://...) "
            f"base_<option> with option in {', '.join(SERVED_OPTIONS)}"
        )
    return load


def whole(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(value).strip() not in (str(number), f"{number}.0"):
        raise UserError(f"{name} must be a whole number of at least 1, got {value!r}")
    return number


def run_name(base: str, expert: str | None, alpha: Any, quantization: str | None = None,
             plausibility: Any = None) -> str:
    """A readable name for one proxy configuration (lm-eval's results folder): base (and its quantization),
    expert (its registered name when it has a card), alpha and proxy.plausibility where it is on."""
    quantized = f"-{quantization}" if quantization else ""
    fraction = number_text(plausibility or 0)
    constrained = f"-plausibility{fraction}" if fraction != "0" else ""
    return (f"proxy-{display_name(base)}{quantized}-{display_name(expert) if expert else 'alone'}"
            f"-alpha{number_text(alpha)}{constrained}")


def number_text(value: Any) -> str:
    """A number as %g ("0.50" -> "0.5"); anything else as given (the model refuses it, in one line)."""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


@register_model("proxy")
class ProxyLM(TemplateLM):
    """lm-eval's three request types answered by a `ProxyEngine`."""

    def __init__(
        self,
        base: str = "tiny-large",
        expert: str | None = None,
        anti_expert: str | None = None,
        alpha: float = 1.0,
        expert_format: str | None = None,
        plausibility: float = 0.0,
        cross_candidates: int = 16,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        model: str | None = None,
        engine: ProxyEngine | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        del model  # only lm-eval reads it: the results folder's name
        kwargs.pop("max_batch_size", None)  # lm-eval passes these to every model type
        device = kwargs.pop("device", None)
        if engine is None:
            from proxy.build import build_engine

            load = load_overrides(kwargs)
            # lm-eval's CLI always passes a device (cuda:0 unless told); it matters only where CUDA is
            if device and device != "cpu" and torch.cuda.is_available() and not any(v["device_map"] for v in load.values()):
                for role in ROLES:
                    load[role]["device_map"] = device
            cfg = OmegaConf.create({
                "base": str(base), "expert": expert, "anti_expert": anti_expert, "load": load,
                "proxy": {"alpha": alpha, "expert_format": expert_format, "extra_pairs": [],
                          "plausibility": plausibility, "cross": {"candidates": cross_candidates, "force": False}},
            })
            engine, _ = build_engine(cfg)
        elif kwargs:
            load_overrides(kwargs)  # refuses unknown names
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> a fixed default
        self.max_gen_toks = whole("max_gen_toks", max_gen_toks)
        self.add_bos_token = add_bos_token
        limits = [engine.context_limit(s.model) for s in engine.streams.values()]
        known = [n for n in limits if n]
        self.max_length = whole("max_length", max_length) if max_length else (min(known) if known else 2048)

    # -- tokens, as lm-eval's hf model has them ------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "proxy").replace("/", "__")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- requests -----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each request is ((context, continuation) or (None,), context ids, continuation ids); like the hf
        model, the model reads at most max_length tokens, the context cut on the left."""
        prepared = []
        for strings, context_enc, continuation_enc in requests:
            if not continuation_enc or len(continuation_enc) > self.max_length:
                raise UserError(f"a continuation of {len(continuation_enc)} tokens cannot be scored in a context "
                                f"of {self.max_length}")
            window = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            text = strings[0] if strings and strings[0] is not None else None
            prepared.append((text, window[: len(window) - len(continuation_enc)], list(continuation_enc)))
        out = []
        for i in tqdm(range(0, len(prepared), self.batch_size), disable=disable_tqdm, desc="proxy loglikelihood"):
            scored = self.engine.score_tokens(prepared[i : i + self.batch_size], batch_size=self.batch_size)
            for (strings, _, _), s in zip(requests[i : i + self.batch_size], scored):
                answer = (s["logprob"], s["is_greedy"])
                if strings and strings[0] is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, answer)
                out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="proxy loglikelihood_rolling"):
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(ll for ll, _ in self._loglikelihood_tokens([((None,), *w) for w in windows], disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}  # requests with the same gen_kwargs run as batches
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="proxy generate_until")
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            settings = self.settings(kwargs, until)
            room = self.max_length - settings.max_new_tokens
            if room < 1:
                raise UserError(f"max_gen_toks={settings.max_new_tokens} leaves no room in a context of "
                                f"{self.max_length} tokens")
            contexts = [requests[i].args[0] for i in indices]
            ids = [self.tok_encode(c, left_truncate_len=room) for c in contexts]
            for i, gen in zip(indices, self.engine.generate(contexts, settings, prompt_ids=ids)):
                text = postprocess_generated_text(self.tok_decode(gen.token_ids), until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                out[i] = text
                bar.update(1)
        bar.close()
        return out  # type: ignore[return-value]

    def settings(self, kwargs: dict[str, Any], until: list[str]) -> GenerationSettings:
        """lm-eval's normalised generation arguments as the engine's settings."""
        kw = dict(kwargs)
        max_new = int(kw.pop("max_gen_toks"))
        do_sample = bool(kw.pop("do_sample", False))
        temperature = kw.pop("temperature", 0.0)
        seed = kw.pop("seed", 0)
        return GenerationSettings(
            max_new_tokens=max_new, do_sample=do_sample, temperature=float(temperature) if do_sample else None,
            seed=seed, stop=[s for s in until if s], batch_size=self.batch_size, config=kw,
        )
