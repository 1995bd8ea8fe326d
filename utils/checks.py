"""Checks of numbers where they enter (a command-line flag or a parameter of the Python API): NaN and infinity
pass comparisons such as `value < 0`, so each range check here also asks for a finite number. `is_id` tests the
ids read from files (annotation jsons, checkpoints, ONNX metadata)."""
import math
import numbers

from utils.errors import ArgumentError


def is_id(value) -> bool:
    """A COCO id: an int, not a bool (a list or dict would not even hash), that fits 64 bits as ids do where they
    become tensors and arrays (json integers have no bound)."""
    return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63


def are_distinct_ids(values: list) -> bool:
    """Whether `values` are COCO ids (`is_id`), none given twice: the category ids of classes, where an id given twice
    would put two classes under one id in the COCO results."""
    return all(map(is_id, values)) and len(set(values)) == len(values)


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *, above: bool = False,
                 below: bool = False) -> float:
    """`value` as a float when it is a finite number in [low, high] (`above`: greater than low; `below`: less than
    high), else an ArgumentError naming `name`, the range and the value."""
    number = value if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    inside = number is not None and math.isfinite(number) and (low < number if above else low <= number) \
        and (number < high if below else number <= high)
    if not inside:
        raise ArgumentError(f"{name}: expected {describe_range(low, high, above, below)}, got {value!r}")
    return float(number)


def describe_range(low: float, high: float, above: bool = False, below: bool = False) -> str:
    if high == math.inf and low == -math.inf:
        return "a finite number"
    if high == math.inf:
        return f"a finite number {'above' if above else 'of at least'} {low:g}"
    if low == -math.inf:
        return f"a finite number {'below' if below else 'of at most'} {high:g}"
    return f"a number in {'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}"


def check_positive_int(name: str, value) -> int:
    """`value` when it is a whole number of at least 1 (not a bool), else an ArgumentError naming `name`."""
    return check_int_at_least(name, value, 1)


def check_non_negative_int(name: str, value) -> int:
    """`value` when it is a whole number of at least 0 (not a bool), else an ArgumentError naming `name`."""
    return check_int_at_least(name, value, 0)


def check_int_at_least(name: str, value, low: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ArgumentError(f"{name}: expected a whole number of at least {low}, got {value!r}")
    return int(value)
