#!/usr/bin/env python3
"""Rebuild the committed sample (data/train.csv, data/product_descriptions.csv) from the full files.

Usage (from the repository root):  python3 data/make_sample.py [../shared/data/home_depot]

Deterministic: the same source files always give byte-identical outputs. Lines are copied byte for
byte (the source has one record per line), so the sample keeps the original latin-1 encoding.

Selection rule: whole queries only (every train row of a chosen search term), so a query group is
never cut. Candidates are the queries with at least one row whose product has a description in the
descriptions prefix file. First the queries that carry non-ASCII bytes on a described row are taken
(smallest first, so latin-1 decoding is exercised), then the rest ordered by the share of their rows
that have a description (highest first), then by size (smallest first), then by text; a query is
added while the total stays within MAX_ROWS.
"""
import csv
import gzip
import io
import sys
from pathlib import Path

MAX_ROWS = 2000
NON_ASCII_QUERIES = 2


def lines(path):
    data = gzip.open(path).read()
    assert b"\r" not in data, f"{path}: expected LF line endings"
    out = data.split(b"\n")
    assert out[-1] == b"", f"{path}: expected a final newline"
    return out[:-1]


def parse(line):
    return next(csv.reader([line.decode("latin-1")]))


def main():
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/home_depot")
    here = Path(__file__).resolve().parent
    train = lines(src / "train.csv.gz")
    descs = lines(src / "product_descriptions_prefix_100001-101387.csv.gz")

    desc_line = {parse(l)[0]: l for l in descs[1:]}
    rows = [(l, parse(l)) for l in train[1:]]  # fields: id, product_uid, product_title, search_term, relevance
    assert all(len(f) == 5 for _, f in rows)

    by_query = {}
    for i, (_, f) in enumerate(rows):
        by_query.setdefault(f[3], []).append(i)

    def described(i):
        return rows[i][1][1] in desc_line

    cands = [q for q, idx in by_query.items() if any(described(i) for i in idx)]
    non_ascii = sorted(
        (q for q in cands if any(described(i) and max(rows[i][0]) > 0x7F for i in by_query[q])),
        key=lambda q: (len(by_query[q]), q),
    )[:NON_ASCII_QUERIES]
    rest = sorted(
        (q for q in cands if q not in non_ascii),
        key=lambda q: (-sum(map(described, by_query[q])) / len(by_query[q]), len(by_query[q]), q),
    )

    chosen, total = [], 0
    for q in non_ascii + rest:
        n = len(by_query[q])
        if total + n <= MAX_ROWS:
            chosen.append(q)
            total += n

    keep = sorted(i for q in chosen for i in by_query[q])  # original file order
    products = {rows[i][1][1] for i in keep}
    with open(here / "train.csv", "wb") as f:
        f.write(b"\n".join([train[0]] + [rows[i][0] for i in keep]) + b"\n")
    kept_desc = [l for l in descs[1:] if parse(l)[0] in products]
    with open(here / "product_descriptions.csv", "wb") as f:
        f.write(b"\n".join([descs[0]] + kept_desc) + b"\n")
    print(
        f"{len(keep)} rows, {len(chosen)} queries, {len(products)} products, "
        f"{len(kept_desc)} descriptions, {sum(described(i) for i in keep)} rows with a description"
    )


if __name__ == "__main__":
    main()
