"""``qtvit models``: the model registry as a table (and the home of other model subcommands).

Each subcommand of this module has a ``_register_<name>(subparsers)`` helper; :func:`register`
calls them all, so adding one (e.g. ``convert``) is one helper and one line in ``register``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``qtvit`` parser."""
    _register_models(subparsers)


# ------------------------------------------------------------------------------------ models
def _register_models(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list the registered models (params, MACs, accuracy)")
    p.add_argument("pattern", nargs="?", default=None, help="glob filter on the model name, e.g. 'qtvit_b*'")
    p.add_argument("--recount", action="store_true",
                   help="also build each model on the meta device and recount params and MACs@224 "
                        "(checks the cards; no memory or compute needed)")
    p.add_argument("--markdown", action="store_true",
                   help="print a Markdown table (README's model table is this output, checked by a test)")
    p.set_defaults(func=run_models)


def _aliases() -> dict[str, list[str]]:
    from .registry import list_models, resolve_model_name

    names = set(list_models())
    out: dict[str, list[str]] = {}
    for alias in list_models(include_aliases=True):
        if alias not in names:
            out.setdefault(resolve_model_name(alias), []).append(alias)
    return out


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def run_models(args: argparse.Namespace) -> int:
    from .registry import get_model_card, list_models

    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no model matches {args.pattern!r}; models: {', '.join(list_models())}")
    aliases = _aliases()
    if args.markdown:
        print(models_markdown(names, aliases))
        return 0
    header = (f"{'model':18s} {'alias':10s} {'paper name':11s} {'params':>12s} {'MACs@224':>9s} "
              f"{'top-1':>6s} {'top-5':>6s}")
    if args.recount:
        header += f"  {'params (built)':>14s} {'MACs (built)':>12s}"
    print(header)
    for name in names:
        card = get_model_card(name)
        macs = "-" if card.gmacs_224 is None else f"{card.gmacs_224:.3f}G"  # the exact count, rounded
        line = (f"{name:18s} {','.join(aliases.get(name, [])) or '-':10s} {card.paper_name or '-':11s} "
                f"{_fmt(card.params, ',d'):>12s} {macs:>9s} "
                f"{_fmt(card.top1, '.1f'):>6s} {_fmt(card.top5, '.1f'):>6s}")
        if args.recount:
            params, macs = _recount(name)
            line += f"  {params:>14,d} {macs / 1e9:>11.3f}G"
        print(line)
    return 0


def models_markdown(names: list[str], aliases: dict[str, list[str]] | None = None) -> str:
    """A Markdown table of the model cards: params and MACs@224 as ``count_macs`` counts them (the
    tests recount both), the paper's GMACs and its reported accuracy (not reproduced here)."""
    from .registry import get_model_card

    aliases = _aliases() if aliases is None else aliases
    lines = ["| model | alias | paper name | params | GMACs@224 (counted) | GMACs (paper) "
             "| paper top-1 / top-5 |", "|---|---|---|---:|---:|---:|---|"]
    for name in names:
        card = get_model_card(name)
        acc = "–" if card.top1 is None else f"{card.top1:.1f} / {_fmt(card.top5, '.1f', '–')}"
        lines.append(f"| {name} | {', '.join(aliases.get(name, [])) or '–'} | {card.paper_name or '–'} "
                     f"| {_fmt(card.params, ',d', '–')} | {_fmt(card.gmacs_224, '.3f', '–')} "
                     f"| {_fmt(card.paper_gmacs_224, '.2f', '–')} | {acc} |")
    return "\n".join(lines)


def _recount(name: str) -> tuple[int, int]:
    import torch

    from .macs import count_macs
    from .registry import create_model, get_model_card

    with torch.device("meta"):  # shapes only: even the 246M-parameter L3 costs nothing
        model = create_model(name)
    in_chans = get_model_card(name).pretrained_cfg.get("input_size", (3,))[0]
    return sum(p.numel() for p in model.parameters()), count_macs(model, (1, in_chans, 224, 224))
