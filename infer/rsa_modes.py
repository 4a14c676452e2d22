"""Which Markov RSA settings and aggregation template a model gets, shared by ``zaya rsa``, ``zaya eval``,
``zaya rl`` and the server's rsa extension.

The shipped demo model (a 1024-token context) was taught its own aggregation template and runs the
settings ``zaya demo`` measures (``RSAConfig.demo()``); any other model gets the report's light preset
and the RSA default template, unless a mode or template is asked for.
"""

from __future__ import annotations

from zaya_jax.demo import is_demo_model

from .rsa_config import DEMO_MODE, RSAConfig

TEMPLATE_KINDS = ("demo", "default")  # the demo model's aggregation template, or AggregationTemplate.default


def default_mode(model: str | None) -> str:
    """The preset a model runs when none is named: demo for the shipped demo model (None), light otherwise."""
    return DEMO_MODE if is_demo_model(model) else "light"


def search_config(model: str | None, mode: str | None = None, **overrides) -> RSAConfig:
    """The preset ``mode`` (default: ``default_mode(model)``) with ``overrides`` (fields; None values are
    not given)."""
    return RSAConfig.preset(mode or default_mode(model), **{k: v for k, v in overrides.items() if v is not None})


def template_kind(model: str | None, requested: str | None = None) -> str:
    """The aggregation template: ``requested`` ("demo" or "default") if given, else ``"demo"`` (the one the
    demo model was taught) for the shipped demo model and ``"default"`` for any other ``model``."""
    return requested or ("demo" if is_demo_model(model) else "default")


def mode_template(model: str | None, mode: str | None) -> str:
    """The template of a run in ``mode``: the demo mode brings the demo's template (for a model trained from
    the demo model, e.g. by ``zaya rl``); otherwise as ``template_kind``."""
    return template_kind(model, DEMO_MODE if mode == DEMO_MODE else None)


def token_template(kind: str, tails: int, tokenizer):
    """The run's ``rsa.TokenTemplate``: the demo model's own aggregation template (``kind`` "demo") or
    the default one, inside ``tokenizer``'s chat template."""
    from zaya_jax.demo import data as demo_data

    from .rsa import AggregationTemplate, TokenTemplate

    if kind not in TEMPLATE_KINDS:
        raise ValueError(f"unknown aggregation template {kind!r}; one of {TEMPLATE_KINDS}")
    text_template = demo_data.TEMPLATE if kind == "demo" else AggregationTemplate.default(tails)
    return TokenTemplate.from_tokenizer(text_template, tails, tokenizer)
