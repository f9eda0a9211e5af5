"""argparse value types shared by the commands (`longcpt.cli`, each evaluation) and the data_prep
scripts: a bad value is an argparse error naming the text, reported like every other bad flag.

Standard library only, so that building the command line stays instant.
"""

from __future__ import annotations

import argparse
import json


def csv_list(kind):
    """An argparse `type` for a non-empty comma-separated list of `kind` ("1024,4096" -> [1024, 4096]).

    Blank items are skipped; an empty list or an item `kind` refuses is an argparse error naming the
    text.
    """

    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return [kind(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def json_object(text: str) -> dict:
    """A JSON object ('{"rope_type": "dynamic", "factor": 1.0}')."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"rope_type\": \"dynamic\", \"factor\": 1.0}}', got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], e.g. 0.4, got {text}")
    return value
