#!/usr/bin/env python3
"""Tokenize throughput of the Python `tokenizers` library on the prompts pipe builds (the baseline
for benches/tokenize.rs; run both through benches/tokenize.sh).

Same data (../shared/data/home_depot/train.csv.gz, 74,067 pairs; descriptions where the prefix file has
them, the title alone elsewhere), same tokenizer (data/tokenizers/qwen3/tokenizer.json.gz), same prompt
rules as src/text/prompt.rs, with the library's batch API doing the work:

    encode_batch(descriptions) -> cut to 350 tokens -> decode_batch -> documents
    encode_batch(bodies)       -> cut to the body budget -> prefix + body + suffix

Timed from strings to prompt id lists. The batch call releases the GIL and runs on every core
(rayon), as the Rust side does. `--api fast` (the default where the library has it, tokenizers >= 0.20)
uses `encode_batch_fast`, which skips the offsets pipe never uses; `--api plain` uses `encode_batch`.
Which is faster depends on the version, machine and load (with tokenizers 0.23.3 on the 2-core
machine, `encode_batch` was the faster, quiet or loaded): benches/tokenize.sh runs both and takes the
faster as the reference. The "bodies only" time is just the one batch call over the formatted
bodies, the narrowest reading of "batch encoding of the same prompts".
"""

import argparse
import csv
import gzip
import io
import os
import struct
import sys
import time

import tokenizers
from tokenizers import Tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
MAX_LENGTH = 512
MAX_DESCRIPTION_TOKENS = 350


def load(data):
    with gzip.open(os.path.join(data, "product_descriptions_prefix_100001-101387.csv.gz")) as f:
        descs = {
            r["product_uid"]: r["product_description"]
            for r in csv.DictReader(io.TextIOWrapper(f, encoding="latin-1", newline=""))
        }
    with gzip.open(os.path.join(data, "train.csv.gz")) as f:
        rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="latin-1", newline="")))
    return [(r["search_term"], r["product_title"], descs.get(r["product_uid"], "")) for r in rows]


def prompts(tok, pairs, prefix_ids, suffix_ids, api):
    budget = MAX_LENGTH - len(prefix_ids) - len(suffix_ids)
    encode_batch = tok.encode_batch_fast if api == "fast" else tok.encode_batch
    # Descriptions: tokenize, and decode the first MAX_DESCRIPTION_TOKENS back to text where longer.
    idx = [i for i, p in enumerate(pairs) if p[2]]
    enc = encode_batch([pairs[i][2] for i in idx], add_special_tokens=False)
    long = [(i, e.ids[:MAX_DESCRIPTION_TOKENS]) for i, e in zip(idx, enc) if len(e.ids) > MAX_DESCRIPTION_TOKENS]
    cut = dict(zip([i for i, _ in long], tok.decode_batch([ids for _, ids in long], skip_special_tokens=False)))
    bodies = []
    for i, (q, t, d) in enumerate(pairs):
        d = cut.get(i, d)
        doc = t + ". " + d if d else t
        bodies.append(f"<Instruct>: {INSTRUCTION}\n<Query>: {q}\n<Document>: {doc}")
    t0 = time.perf_counter()
    enc = encode_batch(bodies, add_special_tokens=False)
    bodies_only = time.perf_counter() - t0
    return [prefix_ids + e.ids[:budget] + suffix_ids for e in enc], bodies_only


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "home_depot"))
    ap.add_argument("--ids", help="write every prompt's ids here (u32 LE, each sequence after its length)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--api", choices=("fast", "plain"), help="encode_batch_fast or encode_batch (default: fast where available)")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.data, "train.csv.gz")):
        print(f"skipped: {args.data} not found (the full Home Depot data lives in ../shared)")
        return

    with open(os.path.join(ROOT, "data", "tokenizers", "qwen3", "tokenizer.json.gz"), "rb") as f:
        tok = Tokenizer.from_str(gzip.decompress(f.read()).decode("utf-8"))
    tok.no_truncation()
    tok.no_padding()
    api = args.api or ("fast" if hasattr(tok, "encode_batch_fast") else "plain")
    name = "encode_batch_fast" if api == "fast" else "encode_batch"
    prefix_ids = tok.encode(PREFIX, add_special_tokens=False).ids
    suffix_ids = tok.encode(SUFFIX, add_special_tokens=False).ids
    pairs = load(args.data)
    n_desc = sum(1 for p in pairs if p[2])
    print(f"python: {len(pairs)} pairs ({n_desc} with a description), tokenizers {tokenizers.__version__}, "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} cpus, {name}")

    best = best_bodies = float("inf")
    out = None
    for run in range(1, args.repeat + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        out, bodies_only = prompts(tok, pairs, prefix_ids, suffix_ids, api)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        best, best_bodies = min(best, secs), min(best_bodies, bodies_only)
        print(f"python run {run}: {secs:.3f} s, {len(pairs) / secs:.0f} pairs/s "
              f"(cpu {cpu:.2f} s, {len(pairs) / cpu:.0f} pairs per cpu-second; "
              f"{name} of bodies alone {bodies_only:.3f} s, {len(pairs) / bodies_only:.0f} pairs/s)")
    print(f"python tokens: {sum(len(x) for x in out)}")
    print(f"RESULT python_api={name}")
    print(f"RESULT python_pairs_per_s={len(pairs) / best:.1f}")
    print(f"RESULT python_bodies_only_pairs_per_s={len(pairs) / best_bodies:.1f}")

    if args.ids:
        with open(args.ids, "wb") as f:
            for ids in out:
                f.write(struct.pack(f"<I{len(ids)}I", len(ids), *ids))


if __name__ == "__main__":
    main()
