#!/usr/bin/python3
"""Parses Prometheus text format with the official Python client's parser.

Usage: prom_parse.py FILE. Prints one JSON object per sample:
{"family", "type", "help", "name", "labels", "value"} where value is
Python's repr of the float ("3.0", "nan", "inf"). Exits 1 with the
parser's message when the text does not parse, 3 when prometheus_client
is not installed (ops/setup installs python3-prometheus-client).
"""
import json
import sys

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    print("prometheus_client is missing: run ops/setup (python3-prometheus-client)",
          file=sys.stderr)
    sys.exit(3)

with open(sys.argv[1], encoding="utf-8") as f:
    text = f.read()
try:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            print(json.dumps({"family": fam.name, "type": fam.type, "help": fam.documentation,
                              "name": s.name, "labels": s.labels, "value": repr(s.value)}))
except Exception as e:  # the parser raises ValueError and others
    print(f"parse error: {e!r}", file=sys.stderr)
    sys.exit(1)
