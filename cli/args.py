"""Argument types shared by the subcommands: a bad value is argparse's one-line error (exit 2)
naming the argument, never a traceback deep inside the command."""

from __future__ import annotations

import argparse

IMAGE_SIZES = (16, 1024)  # the run config's image-size range (common.config.RANGES)


def int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}-{high}")
        return value

    return parse


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def uncertain(text: str) -> str:
    from common.labels import parse_uncertain_policy

    try:
        parse_uncertain_policy(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
