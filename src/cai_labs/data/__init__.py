"""Offline data sets: everything here is generated or ships inside an installed package."""

from cai_labs.data.digits import DigitsSplit, load_digits_split

__all__ = ["DigitsSplit", "load_digits_split"]
