#!/usr/bin/env python3
"""Convert a slice of the committed Home Depot sample into the `pairs` and `grouped` layouts of `load`.

Usage (from the repository root):  python3 data/make_layouts.py

Reads data/train.csv and data/product_descriptions.csv (latin-1) and writes, UTF-8:
  data/pairs.tsv        the pairs layout with renamed columns and binary labels:
                        qid, search_query, pid, product_text, is_relevant (1 when relevance >= 2.33)
  data/pairs.jsonl.gz   the pairs layout as gzipped JSON Lines with title + description and the
                        graded Kaggle relevance: {"q", "product_uid", "name", "details", "grade"}
  data/grouped.jsonl    the grouped layout, one record per query that has a positive:
                        {"query_id", "query", "pos": [titles], "neg": [titles]}
The slice is the first QUERIES search terms in the order they first appear in data/train.csv, each with
all of its rows. Deterministic: the same sample always gives byte-identical files (the gzip header
carries no time stamp or file name).
"""
import csv
import gzip
import io
import json
from pathlib import Path

QUERIES = 200
THRESHOLD = 2.33


def main():
    here = Path(__file__).resolve().parent
    with open(here / "train.csv", encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(here / "product_descriptions.csv", encoding="latin-1", newline="") as f:
        descriptions = {r["product_uid"]: r["product_description"] for r in csv.DictReader(f)}
    order = []
    for r in rows:
        if r["search_term"] not in order:
            order.append(r["search_term"])
    chosen = {q: i + 1 for i, q in enumerate(order[:QUERIES])}
    rows = [r for r in rows if r["search_term"] in chosen]

    def flat(text):
        # TSV has no quoting, so a tab or a line break inside a field would split it.
        return " ".join(text.split())

    tsv = io.StringIO()
    tsv.write("qid\tsearch_query\tpid\tproduct_text\tis_relevant\n")
    for r in rows:
        label = int(float(r["relevance"]) >= THRESHOLD)
        fields = [str(chosen[r["search_term"]]), flat(r["search_term"]), r["product_uid"], flat(r["product_title"])]
        tsv.write("\t".join(fields + [str(label)]) + "\n")
    (here / "pairs.tsv").write_text(tsv.getvalue(), encoding="utf-8")

    jsonl = io.StringIO()
    for r in rows:
        record = {
            "q": r["search_term"],
            "product_uid": int(r["product_uid"]),
            "name": r["product_title"],
            "details": descriptions.get(r["product_uid"], ""),
            "grade": float(r["relevance"]),
        }
        jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
    raw = jsonl.getvalue().encode("utf-8")
    with open(here / "pairs.jsonl.gz", "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
            gz.write(raw)

    grouped = io.StringIO()
    for q in order[:QUERIES]:
        mine = [r for r in rows if r["search_term"] == q]
        pos = [r["product_title"] for r in mine if float(r["relevance"]) >= THRESHOLD]
        neg = [r["product_title"] for r in mine if float(r["relevance"]) < THRESHOLD]
        neg = [t for t in neg if t not in pos]
        if not pos:
            continue
        record = {"query_id": chosen[q], "query": q, "pos": pos, "neg": neg}
        grouped.write(json.dumps(record, ensure_ascii=False) + "\n")
    (here / "grouped.jsonl").write_text(grouped.getvalue(), encoding="utf-8")


if __name__ == "__main__":
    main()
