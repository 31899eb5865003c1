"""avg@n and pass@k of a Hugging Face model on a prompt dataset, per domain, as JSON and a printed table.

    python tools/evaluate.py --model student-hf --data test.jsonl --n 4 [--temperature 1.0] [--out results.json]

Several seeds (`--seed 1 2 3 --out results-s{seed}.json`) are evaluated in one process, one file per seed: the
imports cost more than a small model's evaluation.

Math is graded with math-verify, code by running the row's tests in the sandbox, other domains by exact match
(see megatron_gopd.eval.harness.verifier_kind). With --teacher DIR, also the exact per-token reverse
KL(model || teacher) on the model's own samples (megatron_gopd.eval.divergence).
"""

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory (safetensors, config, tokenizer)")
    parser.add_argument("--data", required=True, nargs="+", help="jsonl/parquet prompt files")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--k", type=int, nargs="*", default=[1], help="pass@k values to report")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--max-prompt-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one evaluation per seed")
    parser.add_argument("--teacher", help="HF model directory: also report the per-token reverse KL(model || teacher) "
                                          "on the model's samples, per domain ({domain}/reverse_kl)")
    parser.add_argument("--out", help="write the metrics and every sample's record here (JSON); with several "
                                      "seeds it must contain {seed}")
    args = parser.parse_args(argv)
    if len(args.seed) > 1 and args.out and "{seed}" not in args.out:
        parser.error(f"--out {args.out}: with several seeds it must contain {{seed}}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    for flag, model in (("--model", args.model), ("--teacher", args.teacher)):
        if model is not None and not Path(model, "config.json").is_file():
            sys.exit(f"error: {flag} {model}: no config.json (a HF model directory is expected)")
    from megatron_gopd.eval.harness import evaluate_hf_model

    results = evaluate_hf_model(
        args.model, args.data, n=args.n, ks=args.k, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        max_prompts=args.max_prompts, max_prompt_len=args.max_prompt_len, batch_size=args.batch_size, seeds=args.seed,
        teacher_dir=args.teacher)
    for seed, (metrics, records) in zip(args.seed, results):
        if len(args.seed) > 1:
            print(f"seed {seed}")
        report(metrics, records, args, seed)


def report(metrics: dict, records: list[dict], args, seed: int) -> None:
    domains = sorted({name.rsplit("/", 1)[0] for name in metrics})  # and "dataset/<file stem>" rows
    columns = sorted({name.rsplit("/", 1)[1] for name in metrics})
    print("| domain | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for domain in domains:
        print(f"| {domain} | " + " | ".join(f"{metrics.get(f'{domain}/{c}', float('nan')):.4g}" for c in columns) + " |")
    if args.out:
        out = Path(args.out.format(seed=seed))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": str(args.model), "n": args.n, "seed": seed, "metrics": metrics,
                                   "samples": records}, indent=1))


if __name__ == "__main__":
    main()
