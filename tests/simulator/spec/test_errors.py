"""The one-line report of a pydantic error that every command prints for bad input."""

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from moeplan.simulator.spec.errors import first_error_line


class _Thing(BaseModel):
    size: int
    nested: dict[str, int] = {}

    @field_validator("size")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"size={v} must be even")
        return v


def _error(data) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _Thing.model_validate(data)
    return info.value


def test_names_the_field_and_the_value():
    assert first_error_line(_error({"size": "x"})) == (
        "size: Input should be a valid integer, unable to parse string as an integer (got 'x')")
    assert first_error_line(_error({"size": "x"}), prefix="--set").startswith("--set: size: ")


def test_leaves_out_values_that_add_nothing():
    assert first_error_line(_error({})) == "size: Field required"  # missing
    assert first_error_line(_error({"size": 3})) == "size: size=3 must be even"  # validator's own words, no "Value error, "
    assert first_error_line(_error({"size": {"a": 1}})) == "size: Input should be a valid integer"  # a whole object


def test_path_parts_take_the_names_the_user_typed():
    assert first_error_line(_error({"size": "x"}), names={"size": "--size"}).startswith("--size: Input should be")


def test_an_error_about_the_whole_input_takes_the_given_name():
    exc = _error(["not", "an", "object"])
    assert first_error_line(exc, whole="file").startswith("file: ")
    assert first_error_line(exc) == exc.errors()[0]["msg"]
