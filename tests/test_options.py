"""``refine``'s options exist once: ``RefineOptions`` against ``refine``'s signature, its docs, the CLI, the fingerprints.

A field added to :class:`RefineOptions` and forgotten in one of them fails
here: ``option_drift`` lists what disagrees, and is tested on a copy of the
dataclass with a field added. Every field also has a value in
``OTHER_VALUES`` below, which changes the fingerprint of a resumable run
(the fields that say ``resume=False`` excepted) and which a ``ggrad refine``
flag carries to ``refine``.
"""

import dataclasses
import inspect

import numpy as np
import pytest

from ggrad_gpu import refine
from ggrad_gpu.cli import command
from ggrad_gpu.refinement import passes
from ggrad_gpu.refinement.options import RefineOptions, resume_settings

# refine's parameters that are data or callbacks, not choices.
NOT_OPTIONS = {"guide", "cube", "initial", "progress", "mask"}

# A value other than the default for every field, and the flags that set it on ``ggrad refine``
# (None: the field has no flag).
OTHER_VALUES = {
    "levels": (2, ["--levels", "2"]),
    "weights": (([1.0, 0.0], [1.0, 0.0]), ["--alpha", "1,0", "--beta", "1,0"]),
    "output_grid": ("guide", ["--output-grid", "guide"]),
    "method": ("band_sum", None),
    "reestimate": (False, None),
    "screen_bands": (False, None),
    "order": (3, None),
    "psf_sigma": (None, None),
    "absorbance": (False, ["--no-absorbance"]),
    "memory_limit": (1 << 30, ["--memory-limit", "1GiB"]),
    "denoise": (False, ["--no-denoise"]),
    "normalise": (False, ["--no-normalise"]),
    "backend": ("numpy", ["--backend", "numpy"]),
    "working_shape": ([32, 40], ["--working-shape", "32", "40"]),
    "band_axis": (0, None),
    "check": (True, ["--check"]),
}


def _refine_actions() -> dict:
    """``{option string: argparse action}`` of ``ggrad refine``."""
    parser = command.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    refine_parser = subparsers.choices["refine"]
    return {string: action for action in refine_parser._actions for string in action.option_strings}


def option_drift(options_class, function, actions: dict) -> list[str]:
    """What disagrees between ``options_class``'s fields and ``function``'s keywords, its docstring, the CLI."""
    problems = []
    parameters = {name: p for name, p in inspect.signature(function).parameters.items() if name not in NOT_OPTIONS}
    options = {option.name: option for option in dataclasses.fields(options_class)}
    for name in sorted(options.keys() - parameters.keys()):
        problems.append(f"{name}: a field of {options_class.__name__}, not a keyword of {function.__name__}")
    for name in sorted(parameters.keys() - options.keys()):
        problems.append(f"{name}: a keyword of {function.__name__}, not a field of {options_class.__name__}")
    doc = inspect.getdoc(function) or ""
    for name, option in sorted(options.items()):
        if name in parameters and parameters[name].default != option.default:
            problems.append(f"{name}: default {option.default!r} in {options_class.__name__}, "
                            f"{parameters[name].default!r} in {function.__name__}")
        if f"\n{name} :" not in doc and not any(f"{name}, " in line and " : " in line for line in doc.splitlines()):
            problems.append(f"{name}: not documented in {function.__name__}'s docstring")
        flag = option.metadata.get("flag")
        if flag is None and not option.metadata.get("no_flag"):
            problems.append(f"{name}: neither a ggrad refine flag nor why it has none")
        elif flag is not None:
            action = actions.get(flag)
            dest = "alpha" if name == "weights" else name
            if action is None or action.dest != dest:
                problems.append(f"{name}: ggrad refine has no flag {flag} that sets {dest}")
        if "resume" not in option.metadata:
            problems.append(f"{name}: does not say whether a resumable run's fingerprint holds it")
    return problems


def test_refine_s_keywords_docs_and_flags_are_the_options():
    assert option_drift(RefineOptions, refine, _refine_actions()) == []


def test_the_check_finds_a_field_forgotten_elsewhere():
    extended = dataclasses.make_dataclass(
        "ExtendedOptions", [("sharpen", bool, dataclasses.field(default=False))], bases=(RefineOptions,),
        frozen=True)
    assert option_drift(extended, refine, _refine_actions()) == [
        "sharpen: a field of ExtendedOptions, not a keyword of refine",
        "sharpen: not documented in refine's docstring",
        "sharpen: neither a ggrad refine flag nor why it has none",
        "sharpen: does not say whether a resumable run's fingerprint holds it",
    ]

    def refine_with_one_more(guide, cube, *, sharpen=False, **others):
        """Parameters
        ----------
        sharpen : bool
        """

    drift = option_drift(RefineOptions, refine_with_one_more, _refine_actions())
    assert "sharpen: a keyword of refine_with_one_more, not a field of RefineOptions" in drift


def test_every_field_has_another_value_here():
    assert set(OTHER_VALUES) == {option.name for option in dataclasses.fields(RefineOptions)}


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_each_option_but_the_memory_limit_changes_a_resumable_run_s_fingerprint(name):
    value, _ = OTHER_VALUES[name]
    changed = resume_settings(RefineOptions(**{name: value})) != resume_settings(RefineOptions())
    assert changed == (name != "memory_limit")


def test_each_flag_of_ggrad_refine_reaches_refine(tmp_path, monkeypatch):
    guide, cube = np.random.default_rng(0).random((64, 80)), np.random.default_rng(1).random((32, 40, 4))
    np.save(tmp_path / "guide.npy", guide)
    np.save(tmp_path / "cube.npy", cube)
    flags = [flag for _, given in OTHER_VALUES.values() if given is not None for flag in given]
    seen = {}

    def fake_refine(guide, cube, **keywords):
        seen.update(keywords)
        raise RuntimeError("stop here")

    monkeypatch.setattr(command, "refine", fake_refine)
    assert command.main(["refine", str(tmp_path / "guide.npy"), str(tmp_path / "cube.npy"), "-o",
                         str(tmp_path / "out"), "-q", *flags]) == command.EXIT_INTERNAL
    for name, (value, given) in OTHER_VALUES.items():
        expected = value if given is not None else RefineOptions().keywords()[name]
        assert seen[name] == expected, name


def test_build_problem_takes_options_or_choices_not_both():
    guide, cube = np.random.default_rng(0).random((64, 80)), np.random.default_rng(1).random((16, 20, 4))
    by_options = passes.build_problem(guide, cube, options=RefineOptions(backend="numpy", levels=2))
    by_choices = passes.build_problem(guide, cube, backend="numpy", levels=2)
    assert by_options.options == by_choices.options
    with pytest.raises(TypeError, match="options or choices"):
        passes.build_problem(guide, cube, options=RefineOptions(), levels=2)
