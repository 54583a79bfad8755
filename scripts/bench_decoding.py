"""Decoding benchmark: the base alone, the proxy engine, the naive loop, speculative proxy decoding and
the shared-weight LoRA pair, timed side by side in one process on the same prompts; then the same on a
deepened base (block expansion: the same tokens, a base that dominates the cost, r >= 4).

    make bench                                   # the embedded family, built by `make demo`
    python -m scripts.bench_decoding --batch 1 8 --new-tokens 128 --repeats 3
    python -m scripts.bench_decoding --base llama2-13b --base-quantization nf4 --expert <7B expert> \
        --anti-expert llama2-7b --prompts-file prompts.jsonl        # real models, on a GPU

Prints tokens/s and ratios to the base alone, the cost model's predictions, and writes the figures as
JSON (path on the last line). Timing is for reading, never asserted: the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from core import PROJECT_ROOT
from core.errors import UserError, exit_on_user_error
from core.files import read_jsonl
from core.loading import load_model, load_tokenizer, resolve_spec
from proxy.engine import GenerationSettings, ProxyEngine, SteeringPair
from proxy.speculative import SpeculativeProxyEngine, expected_speedup
from proxy.streams import ModelStream, left_pad, positions_from_mask
from proxy.vocab import shared_vocab_size


def expand_blocks(model, factor: int):
    """The model deepened `factor` times by block expansion (LLaMA Pro, Wu et al. 2024): after each
    layer, factor - 1 copies of it whose output projections (attention `o_proj`, MLP `down_proj`) are
    zero, so each adds nothing to the residual stream. The outputs are the model's own, exactly;
    every forward still does the deeper model's full work. A cost stand-in for a base that dominates
    the proxy's cost (r >= 4), with the embedded family's tokens and acceptance unchanged."""
    config = copy.deepcopy(model.config)
    layers = config.num_hidden_layers
    config.num_hidden_layers = layers * factor
    if getattr(config, "layer_types", None):
        config.layer_types = [t for t in config.layer_types for _ in range(factor)]
    deep = type(model)(config).to(dtype=model.dtype).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if ".layers." not in name:
            state[name] = tensor
            continue
        head, rest = name.split(".layers.", 1)
        index, leaf = rest.split(".", 1)
        for j in range(factor):
            silent = j > 0 and leaf.endswith(("o_proj.weight", "down_proj.weight"))
            state[f"{head}.layers.{int(index) * factor + j}.{leaf}"] = torch.zeros_like(tensor) if silent else tensor
    deep.load_state_dict(state, strict=True)
    return deep


def forward_flops(model) -> int:
    """Multiply-adds x 2 per token through every Linear (lm head included), attention scores left out."""
    def size(weight) -> int:  # a bitsandbytes 4-bit weight is stored packed; its quant_state has the real shape
        state = getattr(weight, "quant_state", None)
        return state.shape.numel() if state is not None else weight.numel()

    return 2 * sum(size(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear))


@torch.inference_mode()
def naive_proxy(models, tok, prompts, alpha, new_tokens):
    """The seed example's loop: all three models re-run on the whole sequence at every step, no cache."""
    base, expert, anti = models
    rows = [tok(p)["input_ids"] for p in prompts]
    ids, mask = left_pad(rows, tok.pad_token_id)
    for _ in range(new_tokens):
        pos = positions_from_mask(mask)
        s = [m(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float() for m in models]
        nxt = (s[0] + alpha * (s[1] - s[2])).argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@torch.inference_mode()
def base_generate(model, tok, prompts, settings: GenerationSettings) -> int:
    """The base alone through transformers' generate, with the same stop strings as the engines;
    returns the number of new tokens."""
    count = 0
    stop = {"stop_strings": list(settings.stop), "tokenizer": tok} if settings.stop else {}
    for i in range(0, len(prompts), settings.batch_size):
        enc = tok(prompts[i : i + settings.batch_size], return_tensors="pt", padding=True,
                  padding_side="left").to(model.device)
        out = model.generate(**enc, max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **stop)
        new = out[:, enc["input_ids"].shape[1]:]
        for row in new.tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            while row and row[-1] == tok.pad_token_id:  # a finished row is padded to the batch's length
                row.pop()
            count += len(row)
    return count


def engine_run(engine, prompts, settings) -> int:
    engine.generate(prompts, settings)
    return engine.last_stats.new_tokens


def sync() -> None:
    """Wait for queued GPU work, so that wall-clock time covers it (nothing to wait for on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_configs(configs: dict, repeats: int) -> dict[str, tuple[float, int]]:
    """Median seconds and new tokens of each configuration, repeats interleaved so that drifts in the
    machine's load hit every configuration alike."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in configs.items():
            sync()
            start = time.perf_counter()
            tokens[name] = fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(ts), tokens[name]) for name, ts in times.items()}


@torch.inference_mode()
def forward_times(model, batch: int, context: int, lengths=(1,), repeats=30) -> dict[int, float]:
    """Median seconds of one cached forward of n new tokens after `context` tokens, for each n."""
    stream = ModelStream(model)
    ids = torch.randint(10, 200, (batch, context))
    stream.prefill(ids, torch.ones_like(ids))
    nothing = torch.zeros(batch, dtype=torch.long)
    out = {}
    for n in lengths:
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            stream.feed(ids[:, :n])
            sync()
            times.append(time.perf_counter() - start)
            stream.keep(n, nothing)  # roll back, so every repeat sees the same context
        out[n] = statistics.median(times)
    return out


def load_family(args):
    """The embedded family (large, small, the demo's expert), or the models named by --base,
    --expert and --anti-expert with their loading options (real models on a GPU: --base-quantization nf4)."""
    if args.base:
        if not (args.expert and args.anti_expert):
            raise UserError("--base needs --expert and --anti-expert too (a preset, a folder or a hub id each)")
        device_map = "cuda" if torch.cuda.is_available() else None
        small = {"dtype": args.dtype, "device_map": device_map}
        specs = {"base": resolve_spec(args.base, {**small, "quantization": args.base_quantization}),
                 "expert": resolve_spec(args.expert, small), "anti": resolve_spec(args.anti_expert, small)}
        tokenizers = {role: load_tokenizer(spec) for role, spec in specs.items()}
        shared_vocab_size({"base": tokenizers["base"], "expert": tokenizers["expert"],
                           "anti-expert": tokenizers["anti"]})  # refuses tokenizers that differ, before loading
        models = {role: load_model(spec) for role, spec in specs.items()}
        return tokenizers["base"], models["base"], models["expert"], models["anti"], args.expert
    family = Path(args.family)
    if not (family / "large").exists():
        raise UserError(f"no model family at {family}; build it with `make demo` "
                        "or `python -m demo.family --out .cache/tiny-family`, or name real models with --base")
    tok = load_tokenizer(str(family / "large"))
    base = load_model(str(family / "large"))
    anti = load_model(str(family / "small"))
    expert_path = args.expert
    if expert_path is None:
        from core.registry import resolve

        path, card = resolve("tiny-expert")
        expert_path = path if card is not None else None
    expert = load_model(expert_path) if expert_path else anti
    return tok, base, expert, anti, expert_path


def cross_pair_for(args) -> list[SteeringPair]:
    """The demo's fact expert of another tokenizer family with its small base (proxy.cross), where `make demo`
    built them; none for real models (--base) or before."""
    from core.registry import resolve

    path, card = resolve("tiny-other-expert")
    other = Path(args.family) / "other" / "small"
    if args.base or card is None or not other.exists():
        return []
    return [SteeringPair(load_model(path), load_model(str(other)), args.alpha, tokenizer=load_tokenizer(path),
                         anti_tokenizer=load_tokenizer(str(other)))]


def task_prompts_for(args) -> list[str]:
    """--prompts-file (JSONL with a "prompt" field), else the family's held-out task prompts."""
    path = Path(args.prompts_file) if args.prompts_file else Path(args.family) / "task" / "test.jsonl"
    if args.prompts_file or path.exists():
        return [str(r["prompt"]) for r in read_jsonl(path, required=["prompt"])][: args.task_prompts]
    return [" the quick brown"] * args.task_prompts


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default=str(PROJECT_ROOT / ".cache" / "tiny-family"))
    parser.add_argument("--expert", default=None, help="default: the demo's registered 'tiny-expert'")
    parser.add_argument("--base", default=None,
                        help="real models instead of the family: the base (preset, folder or hub id); "
                             "with --expert and --anti-expert")
    parser.add_argument("--anti-expert", default=None, help="with --base: what the expert was tuned from")
    parser.add_argument("--base-quantization", default=None, choices=["nf4", "fp4", "int8"])
    parser.add_argument("--dtype", default=None, help="with --base: e.g. bfloat16 (also the 4-bit compute dtype)")
    parser.add_argument("--prompts-file", default=None, help="JSONL with a \"prompt\" field (default: the family's task)")
    parser.add_argument("--stop", default="\n", help="stop string of the task-prompt workloads")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8, help="prompts of the fixed-length workload")
    parser.add_argument("--task-prompts", type=int, default=64, help="prompts of the task-prompt workload")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--qa-tokens", type=int, default=32, help="cap for the task-prompt workload")
    parser.add_argument("--lora", default=None,
                        help="an unmerged LoRA expert folder (default: the demo's 'tiny-expert-lora'): the shared pair")
    parser.add_argument("--deep-factor", type=int, default=4,
                        help="the deep-base workload's base: the large model's layers times this (1: skip it)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench" / "decoding.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

    tok, base, expert, anti, expert_path = load_family(args)
    if args.lora is None and not args.base:
        from core.registry import resolve

        lora_path, lora_card = resolve("tiny-expert-lora")
        args.lora = lora_path if lora_card is not None else None
    task_prompts = task_prompts_for(args)
    prompts = task_prompts[: args.prompts]
    cuda = torch.cuda.is_available()
    weights_bytes = torch.cuda.memory_allocated() if cuda else 0
    pair = [SteeringPair(expert, anti, args.alpha)]
    flops_ratio = forward_flops(anti) / forward_flops(base)
    bound = 1 + 2 * flops_ratio + 0.3
    print(f"base {args.base or Path(args.family) / 'large'}; expert {expert_path or '(untuned small model)'}; "
          f"small/large FLOPs per token = {flops_ratio:.3f}")

    results = []

    def record(workload, batch, timed, engines, base_name="base_generate"):
        base_rate = timed[base_name][1] / timed[base_name][0]
        rows = []
        for name, (seconds, tokens) in timed.items():
            rate = tokens / seconds
            entry = {"workload": workload, "name": name, "batch": batch, "new_tokens": tokens,
                     "seconds": round(seconds, 4), "tokens_per_s": round(rate, 1),
                     "ratio_to_base": round(base_rate / rate, 3)}  # time per token over the base's
            if name in engines:
                st = engines[name].last_stats
                entry["base_forwards_per_token"] = round(st.base_forwards_per_token, 3)
                if st.acceptance_rate is not None:
                    entry["acceptance_rate"] = round(st.acceptance_rate, 3)
            rows.append(entry)
        results.extend(rows)
        return rows

    def show(rows, r=None, verify=None, g=1.0):
        """g: the base alone's time per token through `generate` over one bare base forward's (per row)."""
        print(f"{'configuration':<20} {'tokens':>7} {'tokens/s':>9} {'x base time':>11} {'base fwd/token':>14}"
              f" {'acceptance':>10} {'model predicts':>14}")
        for e in rows:
            pred = ""
            if r and e["name"].startswith("speculative_k") and e["name"] != "speculative_kauto":
                k = int(e["name"].rsplit("k", 1)[1])
                ratio = 1 / expected_speedup(e.get("acceptance_rate", 0.0), k, r, verify[min(k + 1, 7)]) / g
                e["predicted_ratio_to_base"] = round(ratio, 3)
                pred = f"{ratio:.2f}x"
            print(f"{e['name']:<20} {e['new_tokens']:>7} {e['tokens_per_s']:>9.1f} {e['ratio_to_base']:>10.2f}x "
                  f"{e.get('base_forwards_per_token', ''):>14} {e.get('acceptance_rate', ''):>10} {pred:>14}")

    # workload 1 (issue 2): fixed-length continuations, the plain engine against the base and the naive loop
    plain = ProxyEngine(base, tok, pair)
    cross = cross_pair_for(args)  # an expert of another tokenizer, steering through text (proxy.cross)
    cross_engine = {"proxy_cross": ProxyEngine(base, tok, cross)} if cross else {}
    # the forked small-model worker is CPU-only: a process that has initialised CUDA cannot be forked
    parallel = None if cuda else ProxyEngine(base, tok, pair, parallel=True)
    with_parallel = {} if parallel is None else {"proxy_parallel": parallel}
    for batch in args.batch:
        settings = GenerationSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, batch_size=batch)
        configs = {"base_generate": lambda: base_generate(base, tok, prompts, settings),
                   "proxy": lambda: engine_run(plain, prompts, settings)}
        configs.update({name: (lambda e: lambda: engine_run(e, prompts, settings))(e)
                        for name, e in {**with_parallel, **cross_engine}.items()})
        if not args.skip_naive and not args.base and batch == max(args.batch):  # quadratic: tiny models only
            configs["naive_loop"] = lambda: sum(
                naive_proxy((base, expert, anti), tok, prompts[i : i + batch], args.alpha, args.new_tokens).shape[0]
                * args.new_tokens for i in range(0, len(prompts), batch))
        print(f"\n[fixed length] {len(prompts)} prompts, {args.new_tokens} new tokens each, batch {batch}")
        rows = record("fixed_length", batch, time_configs(configs, args.repeats),
                      {"proxy": plain, **with_parallel, **cross_engine})
        show(rows)
        proxy_t = next(e["seconds"] for e in rows if e["name"] == "proxy")
        for e in (e for e in rows if e["name"] in ("proxy", "proxy_parallel", "proxy_cross")):
            print(f"{e['name']} / base alone = {e['ratio_to_base']:.2f}x; "
                  f"bound 1 + 2 x FLOPs ratio + 0.3 = {bound:.2f}x")
        for e in rows:
            if e["name"] == "naive_loop":
                print(f"proxy engine is {e['seconds'] / proxy_t:.1f}x faster than the naive loop")

    # workload 2 (issue 5): the task's prompts with natural stopping, speculative and shared-pair variants;
    # workload 3: the same on a deepened base (block expansion: same tokens, r >= 4), where the base dominates
    deep = expand_blocks(base, args.deep_factor) if args.deep_factor > 1 and not args.base else None
    for workload, big in (("task_prompts", base), ("deep_base", deep)):
        if big is None:
            continue
        for batch in args.batch:
            settings = GenerationSettings(max_new_tokens=args.qa_tokens, batch_size=batch, stop=[args.stop])
            engines = {"proxy": plain, **with_parallel} if big is base else {"proxy": ProxyEngine(big, tok, pair)}
            engines.update({f"speculative_k{k}": SpeculativeProxyEngine(big, tok, pair, k=k) for k in (2, 4, 6, "auto")})
            if args.lora and big is base:
                from proxy.shared_pair import load_shared_pair

                shared = load_shared_pair(args.lora, **({"device_map": "cuda"} if cuda else {}))
                shared_pair = [SteeringPair(shared, shared, args.alpha, shared=True)]
                engines["shared_pair"] = ProxyEngine(base, tok, shared_pair)
                engines["shared_pair_spec_k4"] = SpeculativeProxyEngine(base, tok, shared_pair, k=4)
            configs = {"base_generate": (lambda m: lambda: base_generate(m, tok, task_prompts, settings))(big)}
            configs.update({name: (lambda e: lambda: engine_run(e, task_prompts, settings))(e)
                            for name, e in engines.items()})
            timed = time_configs(configs, args.repeats)
            tb = forward_times(big, batch, 40, lengths=(1, 3, 5, 7))
            te = forward_times(anti, batch, 40, lengths=(1,))
            r = tb[1] / te[1]
            verify = {n: tb[n] / tb[1] for n in tb}
            g = timed["base_generate"][0] / timed["base_generate"][1] / (tb[1] / batch)
            label = "task prompts" if big is base else f"deep base: {big.config.num_hidden_layers} layers"
            print(f"\n[{label}] {len(task_prompts)} prompts, up to {args.qa_tokens} new tokens, stop at {args.stop!r}, "
                  f"batch {batch}: one base forward "
                  f"{tb[1] * 1e3:.2f} ms, one small forward {te[1] * 1e3:.2f} ms, r = {r:.2f}; verifying n tokens / 1: "
                  + ", ".join(f"{n}: {verify[n]:.2f}" for n in (3, 5, 7))
                  + f"; the base alone's generate spends {g:.2f} bare forwards' time per token")
            rows = record(workload, batch, timed, engines)
            for e in rows:
                e["r"] = round(r, 2)
            show(rows, r, verify, g)
            best = min((e for e in rows if e["name"].startswith("speculative")), key=lambda e: e["ratio_to_base"])
            plain_row = next(e for e in rows if e["name"] == "proxy")
            print(f"{best['name']}: {plain_row['ratio_to_base'] / best['ratio_to_base']:.2f}x faster than the plain "
                  f"proxy engine; {best['ratio_to_base']:.2f}x the base alone's time per token")

    # the same cost model for real sizes, where a forward's time follows the parameters (memory-bound decoding)
    a = next((e["acceptance_rate"] for e in results if e["name"] == "speculative_k4" and e["batch"] == min(args.batch)), 0.6)
    print(f"\ncost model at acceptance {a:.2f}, k=4, verify of 5 tokens ~ 1.1 forwards (GPU, memory-bound):")
    for label, r_real in (("7B steering 13B (r ~ 1.9)", 13 / 7), ("7B steering 70B (r ~ 10)", 70 / 7)):
        plain_ratio = 1 + 2 / r_real
        spec = 1 / expected_speedup(a, 4, r_real, 1.1)
        print(f"  {label}: plain proxy {plain_ratio:.2f}x the base's time; speculative {spec:.2f}x")
    if parallel is not None:
        parallel.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    memory = {}
    if cuda:  # what the loaded models and the decoding took on the GPU
        memory = {"weights_gib": round(weights_bytes / 2**30, 2),
                  "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(f"GPU memory: weights {memory['weights_gib']} GiB, peak {memory['peak_gib']} GiB")
    out.write_text(json.dumps({"flops_ratio": flops_ratio, "bound": bound, "gpu_memory": memory,
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
