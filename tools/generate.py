"""Samples responses from a Hugging Face model for a prompt dataset and stores them as a dataset: the teacher
samples that SFT (off-policy distillation) trains on.

    python tools/generate.py --model math-teacher-hf --data train.jsonl --out sft.jsonl [--n 1] [--only-correct]

Every output row is the input row plus `response` (the decoded text) and `correct` (the verifier's verdict).
"""

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--max-prompts", type=int)
    parser.add_argument("--only-correct", action="store_true", help="keep only samples the verifier accepts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from megatron_gopd.data.prompts import write_jsonl
    from megatron_gopd.eval.harness import evaluate_hf_model

    [(metrics, records)] = evaluate_hf_model(args.model, args.data, n=args.n, temperature=args.temperature,
                                             max_new_tokens=args.max_new_tokens, max_prompts=args.max_prompts,
                                             seeds=(args.seed,))
    sources = _rows_by_uid(args.data)
    rows = [{**sources[r["uid"]], "response": r["response"], "correct": r["correct"]}
            for r in records if r["correct"] or not args.only_correct]
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} samples to {args.out} ({metrics})")


def _rows_by_uid(paths) -> dict:
    """The original rows, keyed like the prompt loader's uids (path:line)."""
    import json
    from pathlib import Path

    rows = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    rows[f"{Path(path)}:{line_no}"] = json.loads(line)
    return rows


if __name__ == "__main__":
    main()
