import copy
import io
import json
import math
import random
import tracemalloc
from pathlib import Path

import orjson
import pytest

from app.validation import (
    LineProblem,
    PreferenceFileError,
    PreferenceFileValidator,
    PreferencePair,
    PreferencePairError,
    ValidationReport,
    _count_plain_pair_chars,
    iter_pairs,
    parse_pair,
    validate_bytes,
)

CASES = Path(__file__).parent / "cases"
DATA = Path(__file__).parents[1] / "examples" / "data"
MAX_LINE_BYTES = 1024 * 1024

QUESTION = {"role": "user", "content": "Name a planet."}
GOOD_PAIR = {
    "chosen": [QUESTION, {"role": "assistant", "content": "Mars."}],
    "rejected": [QUESTION, {"role": "assistant", "content": "The Moon."}],
    "score_chosen": 8.0,
    "score_rejected": 2.0,
}


def good_pair() -> dict:
    return copy.deepcopy(GOOD_PAIR)


def jsonl(*objects) -> bytes:
    return b"".join(json.dumps(obj).encode() + b"\n" for obj in objects)


def validate(data: bytes, max_line_bytes: int = MAX_LINE_BYTES) -> ValidationReport:
    return validate_bytes(data, max_line_bytes)


def located(report: ValidationReport) -> list[tuple[int, str]]:
    return [(problem.line, problem.field) for problem in report.problems]


def only_problem(obj) -> LineProblem:
    """Validate a file of a good pair followed by `obj` and return the problem on line 2."""
    report = validate(jsonl(GOOD_PAIR) + (obj if isinstance(obj, bytes) else jsonl(obj)))
    assert report.pair_count == 1
    assert report.bad_line_count == 1
    assert report.problems[0].line == 2
    return report.problems[0]


def read_case(name: str) -> bytes:
    return (CASES / name).read_bytes()


def case_line(name: str, line: int) -> dict:
    return orjson.loads(read_case(name).splitlines()[line - 1])


# The case files and the outcome each one must have.


def test_case_01_empty_answers():
    report = validate(read_case("01-empty-response.jsonl"))
    assert not report.ok
    assert report.pair_count == 1
    assert located(report) == [(2, "chosen[1].content"), (3, "rejected[1].content")]
    assert "empty" in report.problems[0].message
    assert "whitespace" in report.problems[1].message


def test_case_02_null_values():
    report = validate(read_case("02-null-content.jsonl"))
    assert not report.ok
    assert located(report) == [(2, "rejected[1].content"), (3, "rejected")]
    assert "null" in report.problems[0].message
    assert "null" in report.problems[1].message


def test_case_03_non_string_content():
    report = validate(read_case("03-non-string-content.jsonl"))
    assert not report.ok
    assert report.pair_count == 2
    assert located(report) == [(2, "chosen[1].content"), (4, "chosen[1].content")]
    assert "an object" in report.problems[0].message
    assert "a number" in report.problems[1].message


def test_case_03_text_parts_joined():
    pair = parse_pair(case_line("03-non-string-content.jsonl", 3))
    assert pair.chosen == {"role": "assistant", "content": "Hello!"}


def test_case_04_prompt_differs():
    report = validate(read_case("04-prompt-differs.jsonl"))
    assert not report.ok
    assert located(report) == [(2, "rejected[1].content"), (3, "rejected[1]")]
    assert "message 1 is the first that differs" in report.problems[0].message
    assert "extra turn" in report.problems[1].message


def test_case_06_long_prompt_validates():
    report = validate(read_case("06-prompt-exceeds-max-length.jsonl"))
    assert report.ok
    assert report.pair_count == 2


def test_case_14_bom_same_pairs():
    data = read_case("14-bom.jsonl")
    assert data.startswith(b"\xef\xbb\xbf")
    with_bom = validate(data)
    without_bom = validate(data[3:])
    assert with_bom.ok
    assert with_bom == without_bom
    assert with_bom.pair_count == 2
    assert list(iter_pairs(io.BytesIO(data))) == list(iter_pairs(io.BytesIO(data[3:])))


def test_case_15_crlf_and_blank_lines():
    report = validate(read_case("15-trailing-blank-lines-crlf.jsonl"))
    assert report.ok
    assert report.pair_count == 2
    pairs = list(iter_pairs(io.BytesIO(read_case("15-trailing-blank-lines-crlf.jsonl"))))
    assert pairs[1].rejected == {"role": "assistant", "content": "A shark."}


def test_case_17_score_types():
    report = validate(read_case("17-mixed-types.jsonl"))
    assert not report.ok
    assert report.pair_count == 2
    assert located(report) == [(2, "score_chosen"), (4, "score_chosen")]
    assert "'8.5'" in report.problems[0].message
    assert "NaN" in report.problems[1].message


def test_case_17_null_score_accepted():
    pair = parse_pair(case_line("17-mixed-types.jsonl", 3))
    assert pair.score_chosen is None
    assert pair.score_rejected == 2.0


# The three accepted formats and their canonical form.


def test_format_conversations_canonical():
    pair = parse_pair(
        {
            "chosen": [
                {"role": "system", "content": "Be brief."},
                QUESTION,
                {"role": "assistant", "content": "Mars."},
            ],
            "rejected": [
                {"role": "system", "content": "Be brief."},
                QUESTION,
                {"role": "assistant", "content": "The Moon."},
            ],
            "score_chosen": 9,
            "score_rejected": 1.5,
        }
    )
    assert pair.prompt == [{"role": "system", "content": "Be brief."}, QUESTION]
    assert pair.chosen == {"role": "assistant", "content": "Mars."}
    assert pair.rejected == {"role": "assistant", "content": "The Moon."}
    assert pair.score_chosen == 9.0
    assert pair.score_rejected == 1.5


def test_single_turn_prompt_empty():
    pair = parse_pair(
        {
            "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        }
    )
    assert pair.prompt == []
    assert pair.score_chosen is None


def test_format_prompt_messages_canonical():
    pair = parse_pair(
        {
            "prompt": [QUESTION],
            "chosen": [{"role": "assistant", "content": "Mars."}],
            "rejected": [{"role": "assistant", "content": "The Moon."}],
        }
    )
    assert pair == PreferencePair(
        prompt=[QUESTION],
        chosen={"role": "assistant", "content": "Mars."},
        rejected={"role": "assistant", "content": "The Moon."},
    )


def test_format_prompt_messages_multi_turn_answers():
    follow_up = {"role": "user", "content": "And the largest?"}
    pair = parse_pair(
        {
            "prompt": [QUESTION],
            "chosen": [
                {"role": "assistant", "content": "Mars."},
                follow_up,
                {"role": "assistant", "content": "Jupiter."},
            ],
            "rejected": [
                {"role": "assistant", "content": "Mars."},
                follow_up,
                {"role": "assistant", "content": "Pluto."},
            ],
        }
    )
    assert pair.prompt == [QUESTION, {"role": "assistant", "content": "Mars."}, follow_up]
    assert pair.chosen["content"] == "Jupiter."
    assert pair.rejected["content"] == "Pluto."


def test_prompt_messages_answers_differ():
    with pytest.raises(PreferencePairError) as raised:
        parse_pair(
            {
                "prompt": [QUESTION],
                "chosen": [
                    {"role": "assistant", "content": "Mars."},
                    {"role": "user", "content": "Why?"},
                    {"role": "assistant", "content": "It is red."},
                ],
                "rejected": [
                    {"role": "assistant", "content": "Venus."},
                    {"role": "user", "content": "Why?"},
                    {"role": "assistant", "content": "It is hot."},
                ],
            }
        )
    assert raised.value.field == "rejected[0].content"


def test_format_strings_canonical():
    pair = parse_pair({"prompt": "Name a planet.", "chosen": "Mars.", "rejected": "The Moon."})
    assert pair.prompt == [QUESTION]
    assert pair.chosen == {"role": "assistant", "content": "Mars."}
    assert pair.rejected == {"role": "assistant", "content": "The Moon."}


def test_to_trl_conversational_format():
    pair = parse_pair(good_pair())
    assert pair.to_trl() == {
        "prompt": [QUESTION],
        "chosen": [{"role": "assistant", "content": "Mars."}],
        "rejected": [{"role": "assistant", "content": "The Moon."}],
    }


def test_unknown_keys_ignored():
    obj = good_pair()
    obj["id"] = 17
    obj["source"] = {"name": "demo"}
    obj["chosen"][1]["name"] = "bot"
    obj["chosen"][1]["weight"] = 1
    pair = parse_pair(obj)
    assert pair.chosen == {"role": "assistant", "content": "Mars."}
    assert validate(jsonl(obj)).ok


def test_counts_and_token_estimate():
    report = validate(jsonl(good_pair(), good_pair()))
    chars_per_pair = len("Name a planet.") + len("Mars.") + len("The Moon.")
    assert report.pair_count == 2
    assert report.char_count == 2 * chars_per_pair
    assert report.token_estimate == math.ceil(2 * chars_per_pair / 4)


def test_characters_not_bytes_counted():
    report = validate(jsonl({"prompt": "水", "chosen": "是", "rejected": "🙂"}))
    assert report.char_count == 3
    assert report.token_estimate == 1


def test_report_ok_and_describe_when_valid():
    report = validate(jsonl(good_pair()))
    assert report.ok
    assert report.problems == []
    assert report.describe() == ""


# Each rejected input, one test each.


def test_invalid_utf8_rejected():
    line = json.dumps(good_pair()).encode().replace(b"Mars.", b"Mars\xff.") + b"\n"
    problem = only_problem(line)
    assert problem.field == ""
    assert "invalid UTF-8" in problem.message


def test_lone_surrogate_rejected():
    line = json.dumps(good_pair()).replace("Mars.", "Mars\\ud800.").encode() + b"\n"
    problem = only_problem(line)
    assert problem.field == ""
    assert "surrogate" in problem.message


def test_line_not_json_rejected():
    problem = only_problem(b'{"chosen": [\n')
    assert problem.field == ""
    assert "not valid JSON" in problem.message


def test_line_json_array_rejected():
    problem = only_problem(b"[1, 2]\n")
    assert problem.field == ""
    assert "a list" in problem.message


def test_line_json_string_rejected():
    problem = only_problem(b'"chosen"\n')
    assert "a string" in problem.message


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_missing_side_rejected(side):
    obj = good_pair()
    del obj[side]
    problem = only_problem(obj)
    assert problem.field == side
    assert "missing" in problem.message


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_null_side_rejected(side):
    obj = good_pair()
    obj[side] = None
    problem = only_problem(obj)
    assert problem.field == side
    assert "null" in problem.message


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_empty_side_rejected(side):
    obj = good_pair()
    obj[side] = []
    problem = only_problem(obj)
    assert problem.field == side
    assert "empty list" in problem.message


def test_empty_answer_rejected():
    obj = good_pair()
    obj["chosen"][1]["content"] = ""
    problem = only_problem(obj)
    assert problem.field == "chosen[1].content"
    assert "empty" in problem.message


def test_whitespace_answer_rejected():
    obj = good_pair()
    obj["rejected"][1]["content"] = " \t\n"
    problem = only_problem(obj)
    assert problem.field == "rejected[1].content"
    assert "whitespace" in problem.message


def test_empty_string_answer_rejected():
    problem = only_problem({"prompt": "Say hi.", "chosen": "Hi.", "rejected": "  "})
    assert problem.field == "rejected"
    assert "whitespace" in problem.message


def test_unknown_role_rejected():
    obj = good_pair()
    obj["chosen"][0] = {"role": "human", "content": "Name a planet."}
    problem = only_problem(obj)
    assert problem.field == "chosen[0].role"
    assert "'human'" in problem.message
    assert "system, user or assistant" in problem.message


def test_missing_role_rejected():
    obj = good_pair()
    del obj["rejected"][1]["role"]
    problem = only_problem(obj)
    assert problem.field == "rejected[1].role"
    assert "missing" in problem.message


def test_message_not_object_rejected():
    obj = good_pair()
    obj["chosen"][0] = "Name a planet."
    problem = only_problem(obj)
    assert problem.field == "chosen[0]"


@pytest.mark.parametrize(
    ("content", "expected"), [(42, "a number"), ({"text": "Mars."}, "an object"), (True, "boolean")]
)
def test_non_string_content_rejected(content, expected):
    obj = good_pair()
    obj["chosen"][1]["content"] = content
    problem = only_problem(obj)
    assert problem.field == "chosen[1].content"
    assert expected in problem.message


def test_null_content_rejected():
    obj = good_pair()
    obj["chosen"][0]["content"] = None
    problem = only_problem(obj)
    assert problem.field == "chosen[0].content"
    assert "null" in problem.message


def test_text_parts_joined():
    obj = good_pair()
    obj["chosen"][1]["content"] = [
        {"type": "text", "text": "Mars, "},
        {"type": "text", "text": "the red planet."},
    ]
    assert parse_pair(obj).chosen["content"] == "Mars, the red planet."
    assert validate(jsonl(obj)).ok


def test_image_part_rejected():
    obj = good_pair()
    obj["chosen"][0]["content"] = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}},
    ]
    problem = only_problem(obj)
    assert problem.field == "chosen[0].content[1].type"
    assert "'image_url'" in problem.message


def test_text_part_without_text_rejected():
    obj = good_pair()
    obj["rejected"][1]["content"] = [{"type": "text", "text": None}]
    problem = only_problem(obj)
    assert problem.field == "rejected[1].content[0].text"


def test_last_message_not_assistant_rejected():
    obj = good_pair()
    obj["chosen"] = [{"role": "assistant", "content": "Mars."}, QUESTION]
    problem = only_problem(obj)
    assert problem.field == "chosen[1].role"
    assert "last message" in problem.message


def test_prompts_differ_names_first_index():
    obj = good_pair()
    system = {"role": "system", "content": "Be brief."}
    obj["chosen"].insert(0, system)
    obj["rejected"].insert(0, system)
    obj["rejected"][1] = {"role": "user", "content": "Name a star."}
    problem = only_problem(obj)
    assert problem.field == "rejected[1].content"
    assert "message 1 is the first that differs" in problem.message


def test_prompts_differ_in_role():
    obj = good_pair()
    obj["rejected"][0] = {"role": "system", "content": "Name a planet."}
    problem = only_problem(obj)
    assert problem.field == "rejected[0].role"


def test_extra_turn_on_chosen_side():
    obj = good_pair()
    obj["chosen"].insert(1, {"role": "assistant", "content": "Let me think."})
    problem = only_problem(obj)
    assert problem.field == "chosen[1]"
    assert "extra turn" in problem.message
    assert "chosen has 2 messages before its answer and rejected has 1" in problem.message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(b'"8.5"', "string '8.5'"), (b"NaN", "NaN"), (b"Infinity", "Infinity"),
     (b"-Infinity", "-Infinity"), (b"true", "boolean"), (b"[8]", "a list")],
)
def test_bad_score_rejected(raw, expected):
    line = json.dumps(good_pair()).encode()
    line = line.replace(b'"score_rejected": 2.0', b'"score_rejected": ' + raw)
    problem = only_problem(line + b"\n")
    assert problem.field == "score_rejected"
    assert expected in problem.message


def test_score_overflowing_double_rejected():
    line = json.dumps(good_pair()).encode().replace(b"8.0", b"1e400")
    problem = only_problem(line + b"\n")
    assert problem.field == "score_chosen"
    assert "not a finite number" in problem.message


def test_nan_outside_scores_rejected():
    obj = good_pair()
    obj["meta"] = "X"
    line = json.dumps(obj).encode().replace(b'"X"', b"NaN")
    problem = only_problem(line + b"\n")
    assert problem.field == ""
    assert "NaN" in problem.message


def test_null_and_integer_scores_accepted():
    obj = good_pair()
    obj["score_chosen"] = None
    obj["score_rejected"] = 3
    pair = parse_pair(obj)
    assert pair.score_chosen is None
    assert pair.score_rejected == 3.0
    assert validate(jsonl(obj)).ok


def test_string_prompt_with_message_lists_rejected():
    obj = good_pair()
    obj["prompt"] = "Name a planet."
    problem = only_problem(obj)
    assert problem.field == "prompt"


def test_strings_without_prompt_rejected():
    problem = only_problem({"chosen": "Mars.", "rejected": "The Moon."})
    assert problem.field == "prompt"
    assert "missing" in problem.message


def test_string_and_list_sides_rejected():
    problem = only_problem({"prompt": "Name a planet.", "chosen": "Mars.", "rejected": []})
    assert problem.field == "rejected"


def test_line_too_long_rejected():
    long_pair = good_pair()
    long_pair["chosen"][1]["content"] = "x" * 5000
    report = validate(jsonl(good_pair(), long_pair, good_pair()), max_line_bytes=4096)
    assert report.pair_count == 2
    assert located(report) == [(2, "")]
    assert "4096 bytes" in report.problems[0].message
    assert "RUNDPO_MAX_LINE_BYTES" in report.problems[0].message


def test_last_line_too_long_without_newline():
    long_pair = good_pair()
    long_pair["chosen"][1]["content"] = "x" * 5000
    data = jsonl(good_pair()) + json.dumps(long_pair).encode()
    report = validate(data, max_line_bytes=4096)
    assert located(report) == [(2, "")]


def test_line_at_limit_accepted():
    line = json.dumps(good_pair()).encode()
    report = validate(line + b"\r\n", max_line_bytes=len(line) + 1)
    assert report.ok


def test_empty_file_rejected():
    report = validate(b"")
    assert not report.ok
    assert report.pair_count == 0
    assert report.bad_line_count == 0
    assert "no preference pair" in report.describe()


def test_blank_lines_only_rejected():
    report = validate(b"\xef\xbb\xbf\n  \r\n\t\n")
    assert not report.ok
    assert "no preference pair" in report.describe()


def test_every_line_bad_rejected():
    report = validate(b"[]\n[]\n")
    assert not report.ok
    assert report.bad_line_count == 2


def test_bom_inside_file_rejected():
    data = jsonl(good_pair()) + b"\xef\xbb\xbf" + jsonl(good_pair())
    report = validate(data)
    assert located(report) == [(2, "")]


# Reporting and streaming.


def test_problems_listed_up_to_twenty():
    data = jsonl(good_pair()) + b"[]\n" * 25
    report = validate(data)
    assert report.bad_line_count == 25
    assert len(report.problems) == 20
    assert report.problems[-1].line == 21
    assert "and 5 more" in report.describe()


def test_unparsable_lines_counted_past_limit():
    report = validate(b"{\n" * 30 + b"[\n" + jsonl(good_pair()))
    assert report.bad_line_count == 31
    assert len(report.problems) == 20
    assert report.pair_count == 1


def test_max_listed_setting():
    report = validate_bytes(b"[]\n" * 5, MAX_LINE_BYTES, max_listed=2)
    assert report.bad_line_count == 5
    assert [problem.line for problem in report.problems] == [1, 2]


def test_describe_names_lines_and_fields():
    report = validate(read_case("01-empty-response.jsonl"))
    message = report.describe()
    assert message.startswith("Invalid preference file: 2 bad lines. line 2: chosen[1].content: ")
    assert "; line 3: rejected[1].content: " in message
    assert message.endswith("Fix these lines and upload the file again.")


def mixed_file() -> bytes:
    """A file that exercises every streaming path: BOM, CRLF, blank, bad and overlong lines."""
    long_pair = good_pair()
    long_pair["chosen"][1]["content"] = "y" * 3000
    parts = [
        b"\xef\xbb\xbf" + json.dumps(good_pair()).encode() + b"\r\n",
        b"\r\n",
        json.dumps(long_pair).encode() + b"\n",
        json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "No"}).encode() + b"\n",
        b"   \n",
        read_case("03-non-string-content.jsonl"),
        json.dumps(long_pair).encode() + b"\n",
        read_case("17-mixed-types.jsonl"),
        b"not json\n",
        json.dumps({"prompt": "Sm\u00f6rg\u00e5s", "chosen": "\U0001f642", "rejected": "x"})
        .encode(),
    ]
    return b"".join(parts)


def feed_in_pieces(data: bytes, sizes, max_line_bytes: int) -> ValidationReport:
    validator = PreferenceFileValidator(max_line_bytes)
    position = 0
    for size in sizes:
        if position >= len(data):
            break
        validator.feed(data[position : position + size])
        position += size
    validator.feed(data[position:])
    return validator.finish()


@pytest.mark.parametrize("max_line_bytes", [2048, MAX_LINE_BYTES])
def test_chunk_boundaries_byte_by_byte(max_line_bytes):
    data = mixed_file()
    whole = validate(data, max_line_bytes)
    assert whole.bad_line_count > 0
    assert whole.pair_count > 0
    assert feed_in_pieces(data, [1] * len(data), max_line_bytes) == whole


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_line_bytes", [2048, MAX_LINE_BYTES])
def test_chunk_boundaries_random_sizes(seed, max_line_bytes):
    data = mixed_file()
    whole = validate(data, max_line_bytes)
    generator = random.Random(seed)
    sizes = [generator.choice([1, 2, 3, 7, 100, 1000, 4096]) for _ in range(len(data))]
    assert feed_in_pieces(data, sizes, max_line_bytes) == whole


def test_chunk_boundaries_expected_report():
    report = validate(mixed_file(), 2048)
    assert report.pair_count == 7
    assert located(report) == [
        (3, ""),
        (7, "chosen[1].content"),
        (9, "chosen[1].content"),
        (10, ""),
        (12, "score_chosen"),
        (14, "score_chosen"),
        (15, ""),
    ]


def test_overlong_line_not_kept_in_memory():
    max_line_bytes = 1024 * 1024
    validator = PreferenceFileValidator(max_line_bytes)
    validator.feed(jsonl(good_pair()))
    chunk = b"z" * (256 * 1024)
    tracemalloc.start()
    try:
        for _ in range(80):  # a 20 MB line
            validator.feed(chunk)
        validator.feed(b"\n" + jsonl(good_pair()))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    report = validator.finish()
    assert peak_bytes < 3 * max_line_bytes
    assert report.pair_count == 2
    assert located(report) == [(2, "")]


def test_fast_path_agrees_with_parse_pair():
    lines = []
    for path in sorted(CASES.glob("*.jsonl")) + sorted(DATA.glob("*.jsonl")):
        lines.extend(line for line in path.read_bytes().splitlines() if line.strip())
    answer_a = {"role": "assistant", "content": "a"}
    answer_b = {"role": "assistant", "content": "b"}
    blank_answer = {"role": "assistant", "content": " "}
    user_a = {"role": "user", "content": "a"}
    list_role = {"role": ["user"], "content": "a"}
    variants = [
        good_pair(),
        {**good_pair(), "prompt": [{"role": "system", "content": "Be brief."}]},
        {**good_pair(), "prompt": "Name a planet."},
        {**good_pair(), "score_chosen": True},
        {**good_pair(), "score_chosen": float("inf")},
        {"prompt": 1, "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": ""},
        {"prompt": [], "chosen": [answer_a], "rejected": [answer_b]},
        {"prompt": [{"role": "user"}], "chosen": [answer_a], "rejected": [answer_b]},
        {"chosen": [answer_a], "rejected": [user_a]},
        {"chosen": [user_a], "rejected": [user_a]},
        {"chosen": [answer_a, answer_a], "rejected": [answer_b, answer_a]},
        {"chosen": [answer_a, blank_answer], "rejected": [answer_a, answer_b]},
        {"chosen": [list_role, answer_a], "rejected": [list_role, answer_b]},
    ]
    objects = [orjson.loads(line) for line in lines if _parses(line)] + variants
    for obj in objects:
        fast_count = _count_plain_pair_chars(obj)
        try:
            expected = parse_pair(obj).char_count
        except PreferencePairError:
            assert fast_count == -1, obj
        else:
            assert fast_count in (-1, expected), obj


def _parses(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


# Real data sets and reading stored files.


@pytest.mark.parametrize(
    ("name", "pair_count"),
    [
        ("dpo_en_demo.messages.jsonl", 300),
        ("dpo_en_demo.prompt_messages.jsonl", 300),
        ("instruction_preference.strings.jsonl", 1100),
        ("dpo_zh_demo.messages.jsonl", 300),
    ],
)
def test_real_data_validates(name, pair_count):
    data = (DATA / name).read_bytes()
    report = validate_bytes(data, 4 * 1024 * 1024)
    assert report.problems == []
    assert report.ok
    assert report.pair_count == pair_count
    assert len(list(iter_pairs(io.BytesIO(data)))) == pair_count


def test_real_data_formats_same_pairs():
    messages = list(iter_pairs((DATA / "dpo_en_demo.messages.jsonl").open("rb")))
    prompt_messages = list(iter_pairs((DATA / "dpo_en_demo.prompt_messages.jsonl").open("rb")))
    assert messages == prompt_messages


def test_iter_pairs_raises_at_bad_line():
    data = read_case("02-null-content.jsonl")
    pairs = iter_pairs(io.BytesIO(data))
    assert next(pairs).chosen["content"] == "100 °C (212 °F)."
    with pytest.raises(PreferenceFileError) as raised:
        next(pairs)
    assert raised.value.line == 2
    assert raised.value.field == "rejected[1].content"
    assert str(raised.value).startswith("line 2: rejected[1].content: is null")


def test_iter_pairs_without_final_newline():
    data = jsonl(good_pair(), good_pair()).rstrip(b"\n")
    assert len(list(iter_pairs(io.BytesIO(data)))) == 2
