"""``RSAConfig``: the settings of a Markov RSA search, the ZAYA1 report's presets as named constructors.

One frozen dataclass carries what ``markov_rsa``, ``RSASearch``, ``zaya rsa``, ``zaya eval`` and the
server's rsa extension take: the search's shape (population N, tails C, rounds T, budget beta, tail
tokens tau) and its sampling. Each field's default and help text are written here once; the command
line reads them (``zaya_jax.infer.rsa_cli``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from zaya_jax.validate import is_integer

from .sampling import SEED_MAX, SEED_MIN, check_knobs


def _field(help: str, **kwargs):
    return dataclasses.field(metadata={"help": help}, **kwargs)


@dataclasses.dataclass(frozen=True)
class RSAConfig:
    """A Markov RSA search's settings, checked on construction (ValueError naming the field).

    Presets: ``report_light()``, ``report_high()``, ``report_extra_high()`` (the APEX settings of the
    ZAYA1 report, Table XIII) and ``demo()`` (what ``zaya demo`` runs on the shipped demo model); each
    takes field overrides, e.g. ``RSAConfig.report_light(budget=2048)``. ``preset(mode)`` by name.
    """

    population: int = _field("N, candidates per round")
    tails: int = _field("C, tails per aggregation prompt, drawn without replacement (1: each member continues "
                        "its own)")
    rounds: int = _field("T, aggregation rounds after the first generation (0: plain parallel sampling)")
    budget: int = _field("beta, new tokens per candidate")
    tail_tokens: int = _field("tau, tokens carried forward from each candidate (>= budget: full-chain RSA)")
    final_budget: int | None = _field("new tokens per candidate in the last round (None: budget)", default=None)
    temperature: float = _field("sampling temperature of every round", default=1.0)
    top_p: float = _field("nucleus sampling threshold of every round", default=1.0)
    seed: int = _field("the search's seed: round 0 keyed as generate's rows, later rounds and subset draws by "
                       "salted streams of it", default=0)
    stop_token_ids: tuple[int, ...] | None = _field("tokens that end a candidate (None: the model's EOS ids)",
                                                    default=None)

    def __post_init__(self):
        for name in ("population", "tails", "budget", "tail_tokens") + (() if self.final_budget is None else
                                                                         ("final_budget",)):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not is_integer(self.rounds) or self.rounds < 0:
            raise ValueError(f"rounds must be a non-negative integer, got {self.rounds!r}")
        if self.tails > self.population:
            raise ValueError(f"tails ({self.tails}) cannot exceed population ({self.population}): tails are drawn "
                             "without replacement")
        check_knobs(1, temperature=self.temperature, top_p=self.top_p)
        if not is_integer(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")
        if self.stop_token_ids is not None:  # kept as a tuple: the config stays hashable
            given = self.stop_token_ids
            sequence = isinstance(given, Iterable) and not isinstance(given, (str, bytes))
            ids = tuple(given) if sequence else ()
            if not sequence or not all(is_integer(t) and t >= 0 for t in ids):
                raise ValueError(f"stop_token_ids must be a sequence of token ids, got {given!r}")
            object.__setattr__(self, "stop_token_ids", ids)

    def round_budget(self, t: int) -> int:
        """New tokens per candidate in round ``t``: ``final_budget`` (default ``budget``) in the last."""
        return (self.final_budget or self.budget) if t == self.rounds else self.budget

    @property
    def knobs(self) -> dict:
        """The search's shape: population, tails, rounds, budget, tail_tokens."""
        return {name: getattr(self, name) for name in KNOBS}

    # ------------------------------------------------------------------------------------------ presets
    @classmethod
    def report_light(cls, **overrides) -> "RSAConfig":
        """APEX light (ZAYA1 report, Table XIII): T=2, N=16, C=4, beta=8K, tau=4K."""
        return cls(**{**dict(rounds=2, population=16, tails=4, budget=8192, tail_tokens=4096), **overrides})

    @classmethod
    def report_high(cls, **overrides) -> "RSAConfig":
        """APEX high: T=8, N=16, C=4, beta=16K, tau=4K."""
        return cls(**{**dict(rounds=8, population=16, tails=4, budget=16384, tail_tokens=4096), **overrides})

    @classmethod
    def report_extra_high(cls, **overrides) -> "RSAConfig":
        """APEX extra-high: T=8, N=32, C=4, beta=32K, tau=4K."""
        return cls(**{**dict(rounds=8, population=32, tails=4, budget=32768, tail_tokens=4096), **overrides})

    @classmethod
    def demo(cls, **overrides) -> "RSAConfig":
        """What ``zaya demo`` runs on the shipped demo model (1024-token context): its N and T, and the C,
        tau and budget of its training data."""
        from zaya_jax.demo import BUDGET, DEMO_POPULATION, DEMO_ROUNDS, DEMO_TEMPERATURE, TAIL_TOKENS, TAILS

        return cls(**{**dict(rounds=DEMO_ROUNDS, population=DEMO_POPULATION, tails=TAILS, budget=BUDGET,
                             tail_tokens=TAIL_TOKENS, temperature=DEMO_TEMPERATURE), **overrides})

    @classmethod
    def preset(cls, mode: str, **overrides) -> "RSAConfig":
        """The preset named ``mode`` (one of ``MODES``) with ``overrides``."""
        if mode not in MODES:
            raise ValueError(f"unknown rsa mode {mode!r}; one of {list(MODES)}")
        return getattr(cls, MODES[mode])(**overrides)


KNOBS = ("population", "tails", "rounds", "budget", "tail_tokens")  # a preset sets these; flags override them
# Preset names (``zaya rsa --mode``, the server's ``rsa.mode``) -> RSAConfig's constructors.
MODES = {"light": "report_light", "high": "report_high", "extra-high": "report_extra_high", "demo": "demo"}
DEMO_MODE = "demo"  # the demo model's settings and the aggregation template it was trained on


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(RSAConfig)}


def field_help(name: str) -> str:
    """The help text of ``RSAConfig``'s field ``name``."""
    return _fields()[name].metadata["help"]


def field_type(name: str) -> type:
    """The scalar type of ``RSAConfig``'s field ``name`` (``float`` or ``int``), for a command-line flag."""
    return float if _fields()[name].type.startswith("float") else int
