"""Structured output: response_format as OpenAI takes it, pydantic models, parsed();
checks of bad input, and constrained greedy replies of the real model."""

from __future__ import annotations

import subprocess
import sys
from typing import List

import pytest

import llamarocm
from llamarocm.structured import is_pydantic_model, structured_output

pytestmark = pytest.mark.timeout(120)

pydantic = pytest.importorskip("pydantic")

GREEDY = {"temperature": 0.0, "top_k": 1}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer", "minimum": 0}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)


class Trip(pydantic.BaseModel):
    stops: List[City] = pydantic.Field(min_length=1, max_length=2)


class Even(pydantic.BaseModel):
    n: int

    @pydantic.field_validator("n")
    @classmethod
    def even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("n must be even")
        return value


class Never(pydantic.BaseModel):
    n: int = pydantic.Field(ge=0, le=9)

    @pydantic.field_validator("n")
    @classmethod
    def refuse(cls, value: int) -> int:
        raise ValueError("never valid")


# -- checks ------------------------------------------------------------------------


def test_the_openai_forms_become_schemas():
    wrapped = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}}
    assert structured_output(wrapped, None).json_schema == CITY_SCHEMA
    assert structured_output({"type": "json_object"}, None).json_schema == {"type": "object"}
    text = structured_output({"type": "text"}, None)
    assert text.json_schema is None and text.parse is None
    assert structured_output(City, None).json_schema == City.model_json_schema()
    assert structured_output(None, CITY_SCHEMA).parse is not None  # json_schema= parses too


@pytest.mark.parametrize(
    "response_format, error, words",
    [
        ({"type": "xml"}, ValueError, "must be 'text', 'json_object' or 'json_schema'"),
        ({}, ValueError, "must be 'text'"),
        ({"type": "json_schema"}, TypeError, r"\['json_schema'\] must be a dict"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, TypeError, r"\['schema'\] must be a dict"),
        ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, TypeError, r"\['name'\] must be a str"),
        ({"type": "json_schema", "json_schema": {"schema": {"x": float("nan")}}}, ValueError, "plain JSON"),
        ("json", TypeError, "must be a dict or a pydantic model class, not str"),
        (dict, TypeError, "not a pydantic"),
    ],
)
def test_bad_response_formats_are_refused(response_format, error, words):
    with pytest.raises(error, match=words):
        structured_output(response_format, None)


def test_response_format_and_json_schema_together_are_refused():
    with pytest.raises(ValueError, match="response_format or json_schema, not both"):
        structured_output({"type": "json_object"}, CITY_SCHEMA)
    with pytest.raises(ValueError, match="response_format or grammar, not both"):
        structured_output(City, None, 'root ::= "x"')
    assert structured_output({"type": "text"}, None, 'root ::= "x"').json_schema is None


def test_a_pydantic_model_is_told_by_its_methods():
    assert is_pydantic_model(City) and not is_pydantic_model(City(name="a", country="b"))
    assert not is_pydantic_model(dict) and not is_pydantic_model(None)


def test_parse_errors_carry_the_validation_message():
    parse = structured_output(Even, None).parse
    assert parse('{"n": 4}', False) == Even(n=4)
    with pytest.raises(llamarocm.OutputParseError, match="(?s)does not match Even.*n must be even") as info:
        parse('{"n": 3}', False)
    assert isinstance(info.value, ValueError) and isinstance(info.value.__cause__, pydantic.ValidationError)
    with pytest.raises(llamarocm.OutputParseError, match="cut short by max_tokens"):
        parse('{"n": ', True)
    with pytest.raises(llamarocm.OutputParseError, match="not an object"):
        structured_output({"type": "json_object"}, None).parse("[1]", False)


def test_importing_llamarocm_never_imports_pydantic():
    code = "import sys, llamarocm, llamarocm.structured; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_bad_input_is_refused_before_any_call():
    model = llamarocm.Model.__new__(llamarocm.Model)  # no server: nothing may be called
    with pytest.raises(ValueError, match="not both"):
        model.chat([{"role": "user", "content": "x"}], response_format=City, json_schema=CITY_SCHEMA)
    with pytest.raises(ValueError, match="must be 'text'"):
        model.generate("x", response_format={"type": "yaml"})


# -- the real server -----------------------------------------------------------------


@pytest.mark.integration
def test_chat_returns_a_validated_pydantic_instance(shared_model):
    stream = shared_model.chat(
        [{"role": "user", "content": "Name a city in France."}], response_format=City, max_tokens=64, **GREEDY
    )
    city = stream.parsed()
    assert isinstance(city, City) and city.name and city.country


@pytest.mark.integration
def test_nested_models_with_references_constrain_the_output(shared_model):
    assert "$defs" in Trip.model_json_schema()  # the schema refers to City
    trip = shared_model.chat(
        [{"role": "user", "content": "Plan a short trip."}], response_format=Trip, max_tokens=120, **GREEDY
    ).parsed()
    assert isinstance(trip, Trip) and 1 <= len(trip.stops) <= 2 and all(isinstance(s, City) for s in trip.stops)


@pytest.mark.integration
def test_generate_takes_the_json_schema_form(shared_model):
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    value = shared_model.generate("A city, as JSON:", response_format=response_format, max_tokens=64, **GREEDY).parsed()
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)


@pytest.mark.integration
def test_json_object_gives_an_object(shared_model):
    value = shared_model.chat(
        [{"role": "user", "content": "Describe a cat as JSON."}],
        response_format={"type": "json_object"},
        max_tokens=48,
        **GREEDY,
    )
    try:
        parsed = value.parsed()
    except llamarocm.OutputParseError as exc:  # a small model may ramble past max_tokens
        assert value.finish_reason == "length" and "cut short" in str(exc)
    else:
        assert isinstance(parsed, dict)


@pytest.mark.integration
def test_a_reply_that_fails_validation_raises_output_parse_error(shared_model):
    # The schema (an integer) constrains the output; the model's own check refuses it.
    stream = shared_model.chat([{"role": "user", "content": "n?"}], response_format=Never, max_tokens=32, **GREEDY)
    with pytest.raises(llamarocm.OutputParseError, match="(?s)does not match Never:.*never valid"):
        stream.parsed()


@pytest.mark.integration
def test_a_cut_reply_says_so(shared_model):
    stream = shared_model.chat([{"role": "user", "content": "A city"}], response_format=City, max_tokens=3, **GREEDY)
    with pytest.raises(llamarocm.OutputParseError, match="cut short by max_tokens"):
        stream.parsed()


@pytest.mark.integration
def test_text_format_and_no_format(shared_model):
    stream = shared_model.chat([{"role": "user", "content": "Hi"}], response_format={"type": "text"}, max_tokens=4)
    with pytest.raises(ValueError, match="parsed\\(\\) needs"):
        stream.parsed()
    stream.close()
    stream = shared_model.generate("A city, as JSON:", json_schema=CITY_SCHEMA, max_tokens=64, **GREEDY)
    assert set(stream.parsed()) == {"city", "population"}
