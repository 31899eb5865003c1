"""The toy's two synthetic domains, both with exact answers, worked solutions and a grader.

- "math": integer expressions such as `(17+25)*3-8`. The worked solution evaluates one operation per line in the
  order Python would, then "Answer: 118". Each line is either terse (`17+25=42`) or, with probability
  `detail_prob`, decomposed by place value (`17+25=17+20+5=37+5=42`). The detailed lines are longer but each of
  their steps is easier, so a policy can trade length for accuracy: that is the lever that lets response length
  move with lambda.
  With probability `check_prob` the solution ends with a concluding line that restates the result
  (`So 5+(6-1)+4=14`) before the answer. The pretraining corpus's careless answers (make_data) never follow that
  line, so a model that writes it answers right more often: an optional, longer step that raises accuracy, the
  lever that lets length grow under RL and with lambda (the detailed lines alone did not move it). Off by default.
- "code": pipelines in a tiny DSL over int lists and lowercase strings, e.g. `[3,8,1,6]|map(*2)|filter(>5)|sum`. The answer is found by parsing the prompt text and EXECUTING the reference implementation of each op
  (`run_program`), so the ground truth is by execution. The worked solution traces each op's value.

Every response ends with a final line "Answer: <answer>"; `grade` compares that text with the reference exactly
(whitespace-normalised).

Default difficulty (MathConfig, CodeConfig): 2-4 operations per problem in both domains, so accuracy spreads from
easy 2-step problems to hard 4-step ones instead of sitting at 0% or 100%. Math: operands up to 99, products of a
multi-digit number by one digit (2-9), every intermediate in [0, 999]: multi-digit carries, which tiny models find
hard but learnable (string-only tasks were too easy in the prototype). Code: lists of 3-6 items up to 30 and
strings of 3-6 letters, with ops that need arithmetic (map, filter thresholds, shift through the alphabet, sum)
beside ones that only move items (rev, rot, sort, take, drop, uniq); programs whose answer is given away (an op
that changes nothing, len of an unchanged length, a reduction of one item) are redrawn.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_gopd.eval.verifiers import exact_match

DOMAINS = ("math", "code")
CONCLUSION = "So "  # starts the optional line that restates a math solution's result (MathConfig.check_prob)


@dataclass(frozen=True)
class Problem:
    domain: str
    prompt: str
    answer: str
    solution: str  # the worked response, ending in "Answer: <answer>"
    num_ops: int  # the difficulty knob actually drawn, kept for per-difficulty analysis


# ---------------------------------------------------------------- math

def concludes(solution: str) -> bool:
    """Whether a solution restates its result on the line before its answer (MathConfig.check_prob)."""
    lines = solution.split("\n")
    return len(lines) >= 2 and lines[-2].startswith(CONCLUSION)


@dataclass(frozen=True)
class MathConfig:
    """Difficulty of the math domain (the module doc says why the defaults are what they are)."""

    min_ops: int = 2  # binary operations per expression, drawn uniformly in [min_ops, max_ops]
    max_ops: int = 4
    min_operand: int = 2  # operands of + and - (and the multi-digit side of *)
    max_operand: int = 99
    max_factor: int = 9  # a leaf under * is drawn in [2, max_factor]; one side of every * must be <= max_factor
    max_value: int = 999  # every intermediate value must lie in [0, max_value] (negatives are rejected)
    mul_prob: float = 0.3  # chance that an operation is *, the rest split evenly between + and -
    detail_prob: float = 0.5  # chance that a solution line is decomposed by place value
    check_prob: float = 0.0  # chance that the solution restates its result before the answer (the doc says why)

    def __post_init__(self) -> None:
        _check_range("min_ops", self.min_ops, "max_ops", self.max_ops, lowest=1)
        _check_range("min_operand", self.min_operand, "max_operand", self.max_operand, lowest=0)
        _check_range("2", 2, "max_factor", self.max_factor, lowest=2)
        if self.max_value < self.max_operand:
            raise ValueError(f"max_value ({self.max_value}) must be >= max_operand ({self.max_operand})")
        _check_probability("mul_prob", self.mul_prob)
        _check_probability("detail_prob", self.detail_prob)
        _check_probability("check_prob", self.check_prob)


@dataclass(frozen=True)
class _Num:
    value: int


@dataclass(frozen=True)
class _BinOp:
    op: str  # "+", "-" or "*"
    left: _Expr
    right: _Expr


_Expr = _Num | _BinOp
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_APPLY: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                               "*": lambda a, b: a * b}


class _Rejected(Exception):
    """A drawn problem broke a constraint (a value out of range, an empty list, ...); the caller draws again."""


def sample_math(rng: random.Random, config: MathConfig | None = None) -> Problem:
    """A random expression within the config's constraints, with its worked solution."""
    config = config or MathConfig()
    num_ops = rng.randint(config.min_ops, config.max_ops)
    while True:
        tree = _random_tree(rng, num_ops, config)
        try:
            lines: list[str] = []
            value = _solve(tree, rng, config, lines)
        except _Rejected:
            continue
        answer, prompt = str(value), _render(tree)
        if config.check_prob and rng.random() < config.check_prob:  # drawn only when on: the same data when off
            lines.append(f"{CONCLUSION}{prompt}={answer}")
        return Problem("math", prompt, answer, "\n".join(lines + [f"Answer: {answer}"]), num_ops)


def _random_tree(rng: random.Random, num_ops: int, config: MathConfig, small: bool = False) -> _Expr:
    """A random tree with num_ops operations. `small` asks for a leaf in [2, max_factor] (a factor of *): under
    a *, a leaf beside a subtree is small, and of two leaves one is small, so products stay multi-digit x 1-digit."""
    if num_ops == 0:
        return _Num(rng.randint(2, config.max_factor) if small else rng.randint(config.min_operand, config.max_operand))
    op = "*" if rng.random() < config.mul_prob else rng.choice("+-")
    left_ops = rng.randint(0, num_ops - 1)
    right_ops = num_ops - 1 - left_ops
    small_left = small_right = False
    if op == "*":
        small_left, small_right = left_ops == 0, right_ops == 0
        if small_left and small_right:
            small_left = rng.random() < 0.5
            small_right = not small_left
    return _BinOp(op, _random_tree(rng, left_ops, config, small_left), _random_tree(rng, right_ops, config, small_right))


def _render(expr: _Expr) -> str:
    """The expression with exactly the parentheses that make Python parse it back into this tree (a right operand
    of equal precedence is grouped too), so the solution's post-order steps are the order Python evaluates it in."""
    if isinstance(expr, _Num):
        return str(expr.value)
    left, right = _render(expr.left), _render(expr.right)
    if isinstance(expr.left, _BinOp) and _PRECEDENCE[expr.left.op] < _PRECEDENCE[expr.op]:
        left = f"({left})"
    if isinstance(expr.right, _BinOp) and _PRECEDENCE[expr.right.op] <= _PRECEDENCE[expr.op]:
        right = f"({right})"
    return f"{left}{expr.op}{right}"


def _solve(expr: _Expr, rng: random.Random, config: MathConfig, lines: list[str]) -> int:
    """Evaluates post-order (the order Python evaluates the rendered text in), one solution line per operation."""
    if isinstance(expr, _Num):
        return expr.value
    a = _solve(expr.left, rng, config, lines)
    b = _solve(expr.right, rng, config, lines)
    if expr.op == "*" and min(a, b) > config.max_factor:
        raise _Rejected
    result = _APPLY[expr.op](a, b)
    if not 0 <= result <= config.max_value:
        raise _Rejected
    lines.append(math_step(expr.op, a, b, detailed=rng.random() < config.detail_prob))
    return result


def _place_parts(n: int) -> list[int]:
    """Nonzero place-value parts, largest first: 342 -> [300, 40, 2]."""
    digits = str(n)
    return [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"]


def _fold(first: int, parts: list[int], op: str) -> list[str]:
    """Successive partial results of first op p1 op p2 ...: ["37+5", "42"] for 17, [20, 5], "+"."""
    steps, acc = [], first
    for i, part in enumerate(parts):
        acc = _APPLY[op](acc, part)
        steps.append(str(acc) + "".join(f"{op}{p}" for p in parts[i + 1:]))
    return steps


def math_step(op: str, a: int, b: int, *, detailed: bool) -> str:
    """One scratchpad line for a op b. Terse: 17+25=42. Detailed: decomposed by place value so that each step
    touches one digit position: 17+25=17+20+5=37+5=42;  126-18=126-10-8=116-8=108;
    342*3=300*3+40*3+2*3=900+120+6=1020+6=1026. Detailed falls back to terse when there is nothing to decompose
    (the split operand has one nonzero digit)."""
    if op not in _APPLY:
        raise ValueError(f"unknown arithmetic operator {op!r}")
    terse = f"{a}{op}{b}={_APPLY[op](a, b)}"
    if not detailed:
        return terse
    if op in "+-":
        parts = _place_parts(b)
        if len(parts) < 2:
            return terse
        expanded = str(a) + "".join(f"{op}{p}" for p in parts)
        return "=".join([f"{a}{op}{b}", expanded, *_fold(a, parts, op)])
    expand_left = a >= b  # decompose the larger factor
    big, small = (a, b) if expand_left else (b, a)
    parts = _place_parts(big)
    if len(parts) < 2:
        return terse
    factors = [f"{p}*{small}" if expand_left else f"{small}*{p}" for p in parts]
    products = [p * small for p in parts]
    return "=".join([f"{a}*{b}", "+".join(factors), "+".join(map(str, products)),
                     *_fold(products[0], products[1:], "+")])


# ---------------------------------------------------------------- code: the DSL and its reference implementation

class DSLError(ValueError):
    """A program that does not parse or an op applied to a value it does not accept."""


Value = int | str | list
_LETTERS = string.ascii_lowercase


def show(value: Value) -> str:
    """The canonical text of a DSL value: [1,2,3], "abc" or 7 (no spaces, so answers compare exactly)."""
    if isinstance(value, bool) or not isinstance(value, (int, str, list)):
        raise DSLError(f"not a DSL value: {value!r}")
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ",".join(str(x) for x in value) + "]"
    return str(value)


def _seq(value: Value, op: str) -> str | list:
    if not isinstance(value, (str, list)):
        raise DSLError(f"{op} needs a list or a string, got {show(value)}")
    return value


def _ints(value: Value, op: str) -> list:
    if not isinstance(value, list):
        raise DSLError(f"{op} needs a list, got {show(value)}")
    return value


def _nonempty_ints(value: Value, op: str) -> list:
    if not _ints(value, op):
        raise DSLError(f"{op} of an empty list")
    return value


def _text(value: Value, op: str) -> str:
    if not isinstance(value, str):
        raise DSLError(f"{op} needs a string, got {show(value)}")
    return value


def _like(seq: str | list, items: list) -> str | list:
    """items as the same kind of sequence as seq."""
    return "".join(items) if isinstance(seq, str) else items


def _rot(seq: str | list, k: int) -> str | list:
    k %= max(len(seq), 1)
    return seq[k:] + seq[:k]


def _shift(text: str, k: int) -> str:
    if any(c not in _LETTERS for c in text):
        raise DSLError(f"shift needs lowercase letters, got {show(text)}")
    return "".join(_LETTERS[(_LETTERS.index(c) + k) % 26] for c in text)


_KEEP: dict[str, Callable[[int, int], bool]] = {
    "odd": lambda x, _: x % 2 == 1, "even": lambda x, _: x % 2 == 0, ">": lambda x, k: x > k, "<": lambda x, k: x < k}

# The reference implementation: op syntax (a regex that must match the whole op text) -> (value, op, match) -> value.
_OPS: list[tuple[re.Pattern[str], Callable[[Value, str, re.Match[str]], Value]]] = [
    (re.compile(r"rev"), lambda v, op, m: _seq(v, op)[::-1]),
    (re.compile(r"sort"), lambda v, op, m: _like(v, sorted(_seq(v, op)))),
    (re.compile(r"uniq"), lambda v, op, m: _like(v, list(dict.fromkeys(_seq(v, op))))),
    (re.compile(r"take\((\d+)\)"), lambda v, op, m: _seq(v, op)[:int(m[1])]),
    (re.compile(r"drop\((\d+)\)"), lambda v, op, m: _seq(v, op)[int(m[1]):]),
    (re.compile(r"rot\((\d+)\)"), lambda v, op, m: _rot(_seq(v, op), int(m[1]))),
    (re.compile(r"len"), lambda v, op, m: len(_seq(v, op))),
    (re.compile(r"map\(([+*])(\d+)\)"), lambda v, op, m: [_APPLY[m[1]](x, int(m[2])) for x in _ints(v, op)]),
    (re.compile(r"filter\((odd|even)\)"), lambda v, op, m: [x for x in _ints(v, op) if _KEEP[m[1]](x, 0)]),
    (re.compile(r"filter\(([<>])(\d+)\)"), lambda v, op, m: [x for x in _ints(v, op) if _KEEP[m[1]](x, int(m[2]))]),
    (re.compile(r"sum"), lambda v, op, m: sum(_ints(v, op))),
    (re.compile(r"max"), lambda v, op, m: max(_nonempty_ints(v, op))),
    (re.compile(r"min"), lambda v, op, m: min(_nonempty_ints(v, op))),
    (re.compile(r"shift\((\d+)\)"), lambda v, op, m: _shift(_text(v, op), int(m[1]))),
]


def apply_op(value: Value, op: str) -> Value:
    """Runs one DSL op (e.g. "map(*2)") on a value with the reference implementation."""
    for pattern, fn in _OPS:
        match = pattern.fullmatch(op)
        if match:
            return fn(value, op, match)
    raise DSLError(f"unknown op {op!r}")


def parse_program(text: str) -> tuple[Value, list[str]]:
    """`<literal>|op|op...` -> (input value, op texts); spaces around "|" are allowed. The literal is a list of
    ints or a quoted string."""
    head, *ops = [part.strip() for part in text.split("|")]
    try:
        value = ast.literal_eval(head)
    except (ValueError, SyntaxError) as error:
        raise DSLError(f"bad input literal {head!r}: {error}") from None
    if not (isinstance(value, str) or (isinstance(value, list) and all(type(x) is int for x in value))):
        raise DSLError(f"the input must be a string or a list of ints, got {head!r}")
    if not ops:
        raise DSLError(f"no ops in program {text!r}")
    return value, ops


def run_program(text: str) -> tuple[Value, list[Value]]:
    """Executes a program: (final value, the value after each op)."""
    value, ops = parse_program(text)
    trace = []
    for op in ops:
        value = apply_op(value, op)
        trace.append(value)
    return value, trace


@dataclass(frozen=True)
class CodeConfig:
    """Difficulty of the code domain (the module doc says why the defaults are what they are)."""

    min_ops: int = 2  # ops per program, drawn uniformly in [min_ops, max_ops]
    max_ops: int = 4
    min_len: int = 3  # input list / string length, drawn uniformly
    max_len: int = 6
    max_item: int = 30  # list items are drawn in [0, max_item]
    max_value: int = 999  # every number along the way (items, sums) must be <= max_value
    max_arg: int = 5  # the k of map(+k), map(*k), take(k), drop(k), rot(k), shift(k) is drawn in [1, max_arg]
    string_prob: float = 0.4  # chance that the input is a string rather than a list
    reduce_prob: float = 0.5  # chance that the last op reduces a list to an int (sum, max, min; len after filter/uniq)
    list_ops: str = "all"  # the list ops drawn, comma-separated names from LIST_OPS, or "all"

    def __post_init__(self) -> None:
        _check_range("min_ops", self.min_ops, "max_ops", self.max_ops, lowest=1)
        _check_range("min_len", self.min_len, "max_len", self.max_len, lowest=2)
        _check_range("1", 1, "max_item", self.max_item, lowest=1)
        _check_range("max_item", self.max_item, "max_value", self.max_value, lowest=1)
        _check_range("1", 1, "max_arg", self.max_arg, lowest=1)
        _check_probability("string_prob", self.string_prob)
        _check_probability("reduce_prob", self.reduce_prob)
        unknown = set(self.allowed_list_ops()) - set(LIST_OPS)
        if unknown or not self.allowed_list_ops():
            raise ValueError(f"list_ops must name some of {', '.join(LIST_OPS)} (or be 'all'), got {self.list_ops!r}")

    def allowed_list_ops(self) -> tuple[str, ...]:
        return LIST_OPS if self.list_ops == "all" else tuple(n.strip() for n in self.list_ops.split(",") if n.strip())


LIST_OPS = ("rev", "sort", "uniq", "take", "drop", "rot", "map", "filter")


def _list_op(rng: random.Random, config: CodeConfig) -> str:
    k = rng.randint(1, config.max_arg)
    ops = {"rev": ["rev"], "sort": ["sort"], "uniq": ["uniq"], "take": [f"take({k})"], "drop": [f"drop({k})"],
           "rot": [f"rot({k})"], "map": [f"map(+{k})", f"map(*{k})"],
           "filter": [f"filter({rng.choice(['odd', 'even'])})",
                      f"filter({rng.choice('<>')}{rng.randint(1, config.max_item)})"]}
    return rng.choice([op for name in config.allowed_list_ops() for op in ops[name]])


def _string_op(rng: random.Random, config: CodeConfig) -> str:
    k = rng.randint(1, config.max_arg)
    return rng.choice(["rev", "sort", "uniq", f"take({k})", f"drop({k})", f"rot({k})", f"shift({k})"])


def _reducer(rng: random.Random, value: Value, previous: str | None) -> str | None:
    """A final op that reduces to an int, or None where each would give the answer away: len restates the input's
    length unless the previous op (filter, uniq) changed it in a way that takes work to count."""
    len_is_work = previous is not None and previous.startswith(("filter", "uniq"))
    if isinstance(value, str):
        return "len" if len_is_work else None
    return rng.choice(["sum", "max", "min"] + ["len"] * len_is_work)


def sample_code(rng: random.Random, config: CodeConfig | None = None) -> Problem:
    """A random program whose every op changes a non-empty value, answered by running it."""
    config = config or CodeConfig()
    num_ops = rng.randint(config.min_ops, config.max_ops)
    while True:
        length = rng.randint(config.min_len, config.max_len)
        if rng.random() < config.string_prob:
            value: Value = "".join(rng.choice(_LETTERS) for _ in range(length))
        else:
            value = [rng.randint(0, config.max_item) for _ in range(length)]
        text = show(value)
        ops: list[str] = []
        try:
            for i in range(num_ops):
                op = None
                if i == num_ops - 1 and rng.random() < config.reduce_prob:
                    op = _reducer(rng, value, ops[-1] if ops else None)
                    if op is not None and len(value) < 2:  # reducing one element gives the answer away
                        raise _Rejected
                if op is None:
                    op = _string_op(rng, config) if isinstance(value, str) else _list_op(rng, config)
                new = apply_op(value, op)
                # An op that leaves the value unchanged or empty teaches nothing (and an empty one stops the chain);
                # repeating the previous op mostly undoes it (rev|rev) or is redundant.
                if (new == value or new in ([], "") or _largest(new) > config.max_value
                        or (ops and op == ops[-1])):
                    raise _Rejected
                ops.append(op)
                value = new
        except (_Rejected, DSLError):
            continue
        program = "|".join([text, *ops])
        answer, trace = run_program(program)  # ground truth by executing the prompt text itself
        inputs = [parse_program(program)[0], *trace[:-1]]
        lines = [_trace_line(op, before, after) for op, before, after in zip(ops, inputs, trace)]
        return Problem("code", program, show(answer), "\n".join(lines + [f"Answer: {show(answer)}"]), num_ops)


def _largest(value: Value) -> int:
    if isinstance(value, int):
        return value
    return max(value) if isinstance(value, list) else 0


def _trace_line(op: str, before: Value, after: Value) -> str:
    """`op: value`; a sum shows its running total (6+16+12=22+12=34) since adding many numbers at once is the
    one step a small model cannot do in its head."""
    if op == "sum" and isinstance(before, list) and len(before) > 1:
        return f"{op}: " + "=".join(["+".join(map(str, before)), *_fold(before[0], before[1:], "+")])
    return f"{op}: {show(after)}"


# ---------------------------------------------------------------- shared

SAMPLERS: dict[str, Callable[[random.Random, Any], Problem]] = {"math": sample_math, "code": sample_code}
CONFIGS: dict[str, type] = {"math": MathConfig, "code": CodeConfig}


def sample(domain: str, rng: random.Random, config: MathConfig | CodeConfig | None = None) -> Problem:
    """One problem of `domain` with the given (or default) difficulty."""
    _check_domain(domain)
    if config is not None and not isinstance(config, CONFIGS[domain]):
        raise TypeError(f"{domain} needs a {CONFIGS[domain].__name__}, got {type(config).__name__}")
    return SAMPLERS[domain](rng, config)


def config_from_overrides(domain: str, overrides: dict[str, str]) -> MathConfig | CodeConfig:
    """The domain's config with string overrides ("max_ops" -> "5"), each converted to its field's type."""
    _check_domain(domain)
    cls = CONFIGS[domain]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, text in overrides.items():
        if key not in fields:
            raise ValueError(f"{domain} has no difficulty knob {key!r}; knobs: {', '.join(fields)}")
        kind = {"int": int, "float": float, "str": str}[getattr(fields[key].type, "__name__", fields[key].type)]
        try:
            kwargs[key] = kind(text)
        except ValueError:
            raise ValueError(f"{domain}.{key} must be {kind.__name__}, got {text!r}") from None
    return cls(**kwargs)


def grade(domain: str, response: str, answer: str) -> bool:
    """Whether the text after the response's last "Answer:" equals `answer`, whitespace-normalised."""
    _check_domain(domain)
    return exact_match(response, answer).correct


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown toy domain {domain!r}; domains: {', '.join(DOMAINS)}")


def _check_range(low_name: str, low: int, high_name: str, high: int, *, lowest: int) -> None:
    if low < lowest:
        raise ValueError(f"{low_name} must be >= {lowest}, got {low}")
    if high < low:
        raise ValueError(f"{high_name} ({high}) must be >= {low_name} ({low})")


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")
