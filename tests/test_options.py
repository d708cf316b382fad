"""Options declared once: the command line is generated from the options dataclasses' fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nexttools.advisor import BacktestOptions
from nexttools.cli import cli
from nexttools.errors import UserError
from nexttools.extract import ExtractOptions
from nexttools.extrapolate import ExtrapolateOptions
from nexttools.fit import FitOptions
from nexttools.hub import PushOptions
from nexttools.inspect_run import InspectOptions
from nexttools.options import OPTION_KEY
from tests.cli_helpers import assert_one_line_error, invoke

COMMANDS = [
    ("extract", ExtractOptions, ["run"], {"run": Path("run")}),
    ("fit", FitOptions, [], {}),
    ("backtest", BacktestOptions, ["--eval-cmd", "score {model}"], {"eval_cmd": "score {model}"}),
    ("extrapolate", ExtrapolateOptions, [], {}),
    ("inspect", InspectOptions, [], {}),
    ("push", PushOptions, ["out", "me/model"], {"folder": Path("out"), "repo_id": "me/model"}),
]


@pytest.mark.parametrize(("name", "options_class", "args", "required"), COMMANDS)
def test_every_field_is_an_option_with_the_dataclass_default(name, options_class, args, required) -> None:
    """With only the required arguments, the command builds exactly the dataclass's defaults."""
    command = cli.get_command(None, name)
    context = command.make_context(name, list(args))
    names = {field.name for field in dataclasses.fields(options_class) if OPTION_KEY in field.metadata}
    assert names <= set(context.params), names - set(context.params)
    values = {key: value for key, value in context.params.items() if key in names}
    assert options_class(**values) == options_class(**required)


def test_values_are_parsed_and_checked_by_the_field_kind() -> None:
    extrapolate = cli.get_command(None, "extrapolate")
    params = extrapolate.make_context(
        "extrapolate", ["--max-shard-size", "2GiB", "--method", "rl-extra"]
    ).params
    assert params["max_shard_size"] == 2 * 2**30 and params["method"] == "rl-extra"
    extract = cli.get_command(None, "extract")
    assert extract.make_context("extract", ["run", "--steps", "100:"]).params["steps"] == (100, None)
    backtest = cli.get_command(None, "backtest")
    params = backtest.make_context("backtest", ["--eval-cmd", "x", "--alpha", "1", "--alpha", "2.5"]).params
    assert params["alphas"] == (1.0, 2.5)
    fit = cli.get_command(None, "fit")
    assert fit.make_context("fit", ["--no-refit"]).params["refit"] is False


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["extrapolate", "--max-shard-size", "5 parsecs"], "--max-shard-size"),
        (["extract", "run", "--steps", "9:3"], "LO is greater than HI"),
        (["extract", "run", "--steps", "7"], "expected LO:HI"),
        (["fit", "--epochs", "0"], "--epochs"),
        (["fit", "--lr", "0"], "--lr"),
        (["backtest", "--eval-cmd", "x", "--method", "nope"], "--method"),
    ],
)
def test_a_bad_value_is_one_clear_line(args, fragment, capsys, monkeypatch) -> None:
    code, _, err = invoke(args, capsys, monkeypatch)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize(
    ("options_class", "values", "message"),
    [
        (FitOptions, {"epochs": 0}, "--epochs must be a whole number from 1 to"),
        (FitOptions, {"lr": float("nan")}, "--lr must be a finite number > 0"),
        (FitOptions, {"alpha": -1.0}, "--alpha must be a finite number ≥ 0"),
        (ExtractOptions, {"run": Path("r"), "k": True}, "--k must be a whole number"),
        (ExtractOptions, {"run": Path("r"), "steps": (9, 3)}, "--steps must have LO ≤ HI"),
        (ExtrapolateOptions, {"method": "bogus"}, "--method must be one of next, "),
        (ExtrapolateOptions, {"max_shard_size": 0}, "--max-shard-size must be a positive number of bytes"),
        (BacktestOptions, {"eval_cmd": "x", "alphas": (1.0, float("inf"))}, "--alpha must be a finite"),
    ],
)
def test_options_check_themselves_when_made_from_python(options_class, values, message) -> None:
    """The same rule holds without the command line: the core never re-checks an option's kind."""
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as refused:
        options_class(**values)
    assert "\n" not in str(refused.value)


def test_a_registry_choice_is_read_when_the_options_are_made(monkeypatch: pytest.MonkeyPatch) -> None:
    from nexttools.methods import METHODS

    with pytest.raises(UserError, match="--method must be one of"):
        ExtrapolateOptions(method="later")
    monkeypatch.setitem(METHODS, "later", METHODS["last-interval"])
    assert ExtrapolateOptions(method="later").method == "later"
