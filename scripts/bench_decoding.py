"""Decoding benchmark: the base alone, the proxy engine, the naive loop, speculative proxy decoding and
the shared-weight LoRA pair, timed side by side in one process on the same prompts.

    make bench                                   # the embedded family (built by `make demo`) or a random one
    python -m scripts.bench_decoding --batch 1 8 --new-tokens 128 --repeats 3

Prints tokens/s and ratios to the base alone, the cost model's predictions, and writes the figures as
JSON (path on the last line). Timing is for reading, never asserted: the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from proxy.engine import GenerationSettings, ModelStream, ProxyEngine, SteeringPair, left_pad, positions_from_mask
from proxy.loading import load_model, load_tokenizer
from proxy.speculative import SpeculativeProxyEngine, expected_speedup

PROJECT = Path(__file__).resolve().parent.parent


def forward_flops(model) -> int:
    """Multiply-adds x 2 per token through every Linear (lm head included), attention scores left out."""
    return 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


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
def base_generate(model, tok, prompts, new_tokens, batch):
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True, padding_side="left")
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id)


@torch.inference_mode()
def forward_times(model, batch: int, context: int, lengths=(1,), repeats=30) -> dict[int, float]:
    """Median seconds of one cached forward of n new tokens after `context` tokens, for each n."""
    stream = ModelStream(model)
    ids = torch.randint(10, 200, (batch, context))
    out = {}
    for n in lengths:
        times = []
        for _ in range(repeats):
            stream.prefill(ids, torch.ones_like(ids))
            start = time.perf_counter()
            stream.feed(ids[:, :n])
            times.append(time.perf_counter() - start)
        out[n] = statistics.median(times)
    return out


def load_family(args):
    family = Path(args.family)
    tok = load_tokenizer(str(family / "large"))
    base = load_model(str(family / "large"))
    anti = load_model(str(family / "small"))
    expert_path = args.expert
    if expert_path is None:
        from training.registry import resolve

        path, card = resolve("tiny-expert")
        expert_path = path if card is not None else None
    expert = load_model(expert_path) if expert_path else anti
    return tok, base, expert, anti, expert_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default=str(PROJECT / ".cache" / "tiny-family"))
    parser.add_argument("--expert", default=None, help="default: the demo's registered 'tiny-expert'")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per configuration")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--out", default=str(PROJECT / "outputs" / "bench" / "decoding.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

    if not (Path(args.family) / "large").exists():
        raise SystemExit(f"error: no model family at {args.family}; build it with `make demo` "
                         "or `python -m training.family --out .cache/tiny-family`")
    tok, base, expert, anti, expert_path = load_family(args)
    task = Path(args.family) / "task" / "test.jsonl"
    if task.exists():
        prompts = [json.loads(l)["prompt"] for l in task.read_text().splitlines()[: args.prompts]]
    else:
        prompts = [" the quick brown"] * args.prompts
    pair = [SteeringPair(expert, anti, args.alpha)]
    flops_ratio = forward_flops(anti) / forward_flops(base)
    bound = 1 + 2 * flops_ratio + 0.3
    print(f"family {args.family}; expert {expert_path or '(untuned small model)'}; {len(prompts)} prompts; "
          f"{args.new_tokens} new tokens (forced); small/large FLOPs per token = {flops_ratio:.3f}")

    results = []
    for batch in args.batch:
        settings = GenerationSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, batch_size=batch)
        plain = ProxyEngine(base, tok, pair)
        configs = {
            "base_generate": lambda: base_generate(base, tok, prompts, args.new_tokens, batch),
            "proxy": lambda: plain.generate(prompts, settings),
        }
        spec_engines = {f"speculative_k{k}": SpeculativeProxyEngine(base, tok, pair, k=k) for k in (2, 4, 6, "auto")}
        for name, eng in spec_engines.items():
            configs[name] = (lambda e: lambda: e.generate(prompts, settings))(eng)
        if not args.skip_naive and batch == max(args.batch):
            configs["naive_loop"] = lambda: [naive_proxy((base, expert, anti), tok, prompts[i : i + batch],
                                                         args.alpha, args.new_tokens)
                                             for i in range(0, len(prompts), batch)]
        times: dict[str, list[float]] = {name: [] for name in configs}
        stats = {}
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every configuration alike
            for name, fn in configs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                if name in spec_engines:
                    stats[name] = spec_engines[name].last_stats
                elif name == "proxy":
                    stats[name] = plain.last_stats
        new_tokens = len(prompts) * args.new_tokens
        base_t = statistics.median(times["base_generate"])
        for name, ts in times.items():
            t = statistics.median(ts)
            entry = {"name": name, "batch": batch, "new_tokens": new_tokens, "seconds": round(t, 4),
                     "tokens_per_s": round(new_tokens / t, 1), "ratio_to_base": round(t / base_t, 3)}
            if name in stats:
                entry["base_forwards_per_token"] = round(stats[name].base_forwards_per_token, 3)
                if stats[name].acceptance_rate is not None:
                    entry["acceptance_rate"] = round(stats[name].acceptance_rate, 3)
            results.append(entry)

        # the cost model's inputs, measured here: r and the cost of verifying k+1 tokens
        context = 40
        tb = forward_times(base, batch, context, lengths=(1, 3, 5, 7))
        te = forward_times(anti, batch, context, lengths=(1,))
        r = tb[1] / te[1]
        print(f"\nbatch {batch}: one base forward {tb[1] * 1e3:.2f} ms, one small forward {te[1] * 1e3:.2f} ms, "
              f"r = {r:.2f}; verify k+1 tokens / 1 token: "
              + ", ".join(f"{n}: {tb[n] / tb[1]:.2f}" for n in (3, 5, 7)))
        print(f"{'configuration':<20} {'tokens/s':>9} {'x base time':>11} {'base fwd/token':>14} {'acceptance':>10}"
              f" {'model predicts':>14}")
        for entry in [e for e in results if e["batch"] == batch]:
            pred = ""
            if entry["name"].startswith("speculative_k") and entry["name"] != "speculative_kauto":
                k = int(entry["name"].rsplit("k", 1)[1])
                a = entry.get("acceptance_rate", 0.0)
                pred = f"{1 / expected_speedup(a, k, r, tb[min(k + 1, 7)] / tb[1]):.2f}x"
                entry["predicted_ratio_to_base"] = float(pred[:-1])
            print(f"{entry['name']:<20} {entry['tokens_per_s']:>9.1f} {entry['ratio_to_base']:>10.2f}x "
                  f"{entry.get('base_forwards_per_token', ''):>14} {entry.get('acceptance_rate', ''):>10} {pred:>14}")
        proxy_ratio = next(e["ratio_to_base"] for e in results if e["batch"] == batch and e["name"] == "proxy")
        print(f"proxy engine / base alone = {proxy_ratio:.2f}x; the bound 1 + 2 x FLOPs ratio + 0.3 = {bound:.2f}x")
        naive = [e for e in results if e["batch"] == batch and e["name"] == "naive_loop"]
        if naive:
            print(f"proxy engine is {naive[0]['seconds'] / next(e['seconds'] for e in results if e['batch'] == batch and e['name'] == 'proxy'):.1f}x faster than the naive loop")

    # the same cost model for real sizes, where a forward's time follows the parameters (memory-bound decoding)
    a = next((e["acceptance_rate"] for e in results if e["name"] == "speculative_k4" and e["batch"] == 1), 0.6)
    print(f"\ncost model at acceptance {a:.2f}, k=4, verify of 5 tokens ~ 1.1 forwards (GPU, memory-bound):")
    for label, r_real in (("7B steering 13B (r ~ 1.9)", 13 / 7), ("7B steering 70B (r ~ 10)", 70 / 7)):
        plain_ratio = 1 + 2 / r_real
        spec = 1 / expected_speedup(a, 4, r_real, 1.1)
        print(f"  {label}: plain proxy {plain_ratio:.2f}x the base's time; speculative {spec:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"flops_ratio": flops_ratio, "bound": bound, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
