"""Validation of JSONL preference files and the canonical form of a preference pair.

A preference file has one JSON object per line, in one of three formats:

(a) `chosen` and `rejected` as whole conversations, lists of `{"role", "content"}` messages
    that share every message before the final assistant answer, with optional
    `score_chosen` and `score_rejected`.
(b) A shared `prompt` message list, with `chosen` and `rejected` message lists that contain
    the assistant turn or turns.
(c) Plain strings `prompt`, `chosen` and `rejected`.

Blank and whitespace-only lines, a UTF-8 byte-order mark at the start of the file and CRLF
line ends are accepted. Keys other than `prompt`, `chosen`, `rejected`, `score_chosen` and
`score_rejected` are ignored, and so are message keys other than `role` and `content`.
Content given as a list of `{"type": "text", "text": ...}` parts is joined into one string
with no separator, and any other part type is rejected.

`PreferenceFileValidator` checks a file fed in byte chunks of any size, in memory bounded by
`max_line_bytes` plus one chunk. `parse_pair` and `iter_pairs` turn lines into
`PreferencePair`s for training.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from math import isfinite
from typing import Any, BinaryIO

import orjson

BOM = b"\xef\xbb\xbf"
ROLES = ("system", "user", "assistant")
CHARS_PER_TOKEN = 4
READ_CHUNK_BYTES = 1024 * 1024
_JSON_WHITESPACE = b" \t\r"


class PreferencePairError(Exception):
    """A preference pair that cannot be used, with the JSON path of the bad value.

    `field` is a path such as `chosen[1].content`, or empty when the whole line is at fault.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class PreferenceFileError(ValueError):
    """A line of a stored preference file that `iter_pairs` cannot turn into a pair."""

    def __init__(self, line: int, field: str, message: str) -> None:
        location = f"line {line}: {field}" if field else f"line {line}"
        super().__init__(f"{location}: {message}")
        self.line = line
        self.field = field
        self.message = message


@dataclass(slots=True)
class PreferencePair:
    """One preference pair in canonical conversational form.

    `prompt` contains every message before the answers and may be empty. `chosen` and `rejected`
    are single assistant messages.
    """

    prompt: list[dict[str, str]]
    chosen: dict[str, str]
    rejected: dict[str, str]
    score_chosen: float | None = None
    score_rejected: float | None = None

    @property
    def char_count(self) -> int:
        """Characters of prompt, chosen and rejected text, counting the prompt once."""
        prompt_chars = 0
        for message in self.prompt:
            prompt_chars += len(message["content"])
        return prompt_chars + len(self.chosen["content"]) + len(self.rejected["content"])

    def to_trl(self) -> dict[str, list[dict[str, str]]]:
        """Return the pair in TRL's conversational preference format."""
        return {"prompt": self.prompt, "chosen": [self.chosen], "rejected": [self.rejected]}


class _NonFiniteConstant(str):
    """A bare `NaN`, `Infinity` or `-Infinity` found while diagnosing a rejected line."""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, _NonFiniteConstant):
        return f"the bare constant {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _content_text(content: Any, path: str) -> str:
    """Return message content as one string, joining a list of text parts."""
    if type(content) is str:
        return content
    if content is None:
        raise PreferencePairError(path, "is null. Give the message text as a string")
    if type(content) is not list:
        raise PreferencePairError(
            path,
            f"is {_json_type(content)}, but message content must be a string or a list of"
            ' {"type": "text", "text": "..."} parts',
        )
    texts = []
    for index, part in enumerate(content):
        part_path = f"{path}[{index}]"
        if type(part) is not dict:
            raise PreferencePairError(
                part_path,
                f"is {_json_type(part)}, but a content part must be"
                ' {"type": "text", "text": "..."}',
            )
        if part.get("type") != "text":
            raise PreferencePairError(
                f"{part_path}.type",
                f"is {part.get('type')!r}, but only text parts are supported."
                " Remove images and other non-text parts",
            )
        text = part.get("text")
        if type(text) is not str:
            raise PreferencePairError(
                f"{part_path}.text", f"is {_json_type(text)}, but a text part needs a string"
            )
        texts.append(text)
    return "".join(texts)


def _parse_messages(value: Any, path: str) -> list[dict[str, str]]:
    if type(value) is not list:
        raise PreferencePairError(
            path,
            f'is {_json_type(value)}, expected a list of {{"role": ..., "content": ...}} messages',
        )
    messages = []
    for index, message in enumerate(value):
        if type(message) is not dict:
            raise PreferencePairError(
                f"{path}[{index}]",
                f'is {_json_type(message)}, expected a {{"role": ..., "content": ...}} message',
            )
        role = message.get("role")
        # A tuple, not a set: `in` then compares with == and cannot fail on a list value.
        if role not in ROLES or type(role) is not str:
            found = "missing" if role is None else f"{role!r}"
            raise PreferencePairError(
                f"{path}[{index}].role",
                f"is {found}, but a message role must be system, user or assistant",
            )
        content = message.get("content")
        if type(content) is not str:
            content = _content_text(content, f"{path}[{index}].content")
        messages.append({"role": role, "content": content})
    return messages


def _split_answer(messages: list[dict[str, str]], path: str) -> dict[str, str]:
    """Check and return the last message of one side, which must be a non-blank answer."""
    if not messages:
        raise PreferencePairError(
            path, "is an empty list, but it must end with the assistant's answer"
        )
    last = len(messages) - 1
    answer = messages[last]
    if answer["role"] != "assistant":
        raise PreferencePairError(
            f"{path}[{last}].role",
            f"is {answer['role']!r}, but the last message must be the assistant's answer",
        )
    content = answer["content"]
    if not content or content.isspace():
        state = "empty" if not content else "only whitespace"
        raise PreferencePairError(
            f"{path}[{last}].content",
            f"is {state}. Write the answer text or remove the pair",
        )
    return answer


def _check_shared_turns(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> None:
    """Raise unless chosen and rejected contain the same messages before their answers."""
    chosen_turns = chosen[:-1]
    rejected_turns = rejected[:-1]
    if chosen_turns == rejected_turns:
        return
    for index, (left, right) in enumerate(zip(chosen_turns, rejected_turns, strict=False)):
        if left != right:
            part = "role" if left["role"] != right["role"] else "content"
            raise PreferencePairError(
                f"rejected[{index}].{part}",
                f"differs from chosen[{index}].{part}, but chosen and rejected must share"
                f" every message before their final answers (message {index} is the first"
                " that differs)",
            )
    shorter, longer = ("chosen", "rejected")
    if len(chosen_turns) > len(rejected_turns):
        shorter, longer = longer, shorter
    index = min(len(chosen_turns), len(rejected_turns))
    raise PreferencePairError(
        f"{longer}[{index}]",
        f"is an extra turn, because {longer} has"
        f" {max(len(chosen_turns), len(rejected_turns))} messages before its answer and"
        f" {shorter} has {index}. Chosen and rejected must share every message before their"
        " final answers",
    )


def _parse_score(value: Any, name: str) -> float | None:
    if value is None:
        return None
    value_type = type(value)
    if value_type is float:
        if isfinite(value):
            return value
    elif value_type is int:
        return float(value)
    if isinstance(value, _NonFiniteConstant) or value_type is float:
        raise PreferencePairError(
            name, f"is {value}, which is not a finite number. Give a number or leave it out"
        )
    if value_type is str:
        raise PreferencePairError(
            name, f"is the string {value!r}. Write the score as a JSON number, without quotes"
        )
    raise PreferencePairError(
        name, f"is {_json_type(value)}. Give a number, null, or leave the score out"
    )


def _require_side(obj: dict, name: str) -> Any:
    value = obj.get(name)
    if value is None:
        state = "null" if name in obj else "missing"
        raise PreferencePairError(
            name, f"is {state}, but every line needs both chosen and rejected answers"
        )
    if not value and type(value) is list:
        raise PreferencePairError(
            name, "is an empty list, but it must end with the assistant's answer"
        )
    return value


def _parse_strings(obj: dict, chosen: str, rejected: Any, prompt: Any) -> PreferencePair:
    if type(rejected) is not str:
        raise PreferencePairError(
            "rejected",
            f"is {_json_type(rejected)}, but chosen is a string. Give both as strings or both"
            " as message lists",
        )
    if prompt is None:
        raise PreferencePairError(
            "prompt",
            "is missing, but plain-string chosen and rejected need a prompt string. Add the"
            " prompt, or give chosen and rejected as message lists",
        )
    if type(prompt) is not str:
        raise PreferencePairError(
            "prompt",
            f"is {_json_type(prompt)}, but chosen and rejected are strings. Give the prompt as"
            " a string too",
        )
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text or text.isspace():
            state = "empty" if not text else "only whitespace"
            raise PreferencePairError(name, f"is {state}. Write the answer text or remove the pair")
    return PreferencePair(
        prompt=[{"role": "user", "content": prompt}],
        chosen={"role": "assistant", "content": chosen},
        rejected={"role": "assistant", "content": rejected},
        score_chosen=_parse_score(obj.get("score_chosen"), "score_chosen"),
        score_rejected=_parse_score(obj.get("score_rejected"), "score_rejected"),
    )


def parse_pair(obj: Any) -> PreferencePair:
    """Check one decoded line and return it in canonical form.

    Raises PreferencePairError naming the JSON path of the first bad value.
    """
    if type(obj) is not dict:
        raise PreferencePairError(
            "",
            f"the line is {_json_type(obj)}, expected a JSON object with chosen and rejected",
        )
    chosen = _require_side(obj, "chosen")
    rejected = _require_side(obj, "rejected")
    prompt = obj.get("prompt")
    if type(chosen) is str:
        return _parse_strings(obj, chosen, rejected, prompt)

    chosen_messages = _parse_messages(chosen, "chosen")
    rejected_messages = _parse_messages(rejected, "rejected")
    chosen_answer = _split_answer(chosen_messages, "chosen")
    rejected_answer = _split_answer(rejected_messages, "rejected")
    _check_shared_turns(chosen_messages, rejected_messages)
    if prompt is None:
        shared = chosen_messages[:-1]
    elif type(prompt) is list:
        shared = _parse_messages(prompt, "prompt") + chosen_messages[:-1]
    else:
        raise PreferencePairError(
            "prompt",
            f"is {_json_type(prompt)}, but chosen and rejected are message lists. Give the"
            " prompt as a message list too, or leave it out",
        )
    return PreferencePair(
        prompt=shared,
        chosen=chosen_answer,
        rejected=rejected_answer,
        score_chosen=_parse_score(obj.get("score_chosen"), "score_chosen"),
        score_rejected=_parse_score(obj.get("score_rejected"), "score_rejected"),
    )


def _count_plain_pair_chars(obj: Any) -> int:
    """Return `parse_pair(obj).char_count` for a pair in the common shape, else -1.

    A fast path for the validator: it accepts only pairs that `parse_pair` accepts, with the
    same count, and returns -1 for anything unusual (text parts, extra message keys,
    errors), which the validator then hands to `parse_pair`.
    """
    if type(obj) is not dict:
        return -1
    score = obj.get("score_chosen")
    if score is not None and type(score) is not int:
        if type(score) is not float or not isfinite(score):
            return -1
    score = obj.get("score_rejected")
    if score is not None and type(score) is not int:
        if type(score) is not float or not isfinite(score):
            return -1
    chosen = obj.get("chosen")
    rejected = obj.get("rejected")
    prompt = obj.get("prompt")

    if type(chosen) is str:
        if type(rejected) is not str or type(prompt) is not str:
            return -1
        if not chosen or chosen.isspace() or not rejected or rejected.isspace():
            return -1
        return len(prompt) + len(chosen) + len(rejected)

    if type(chosen) is not list or type(rejected) is not list or not chosen or not rejected:
        return -1
    chars = 0
    if prompt is not None:
        if type(prompt) is not list:
            return -1
        for message in prompt:
            if type(message) is not dict or message.get("role") not in ROLES:
                return -1
            content = message.get("content")
            if type(content) is not str:
                return -1
            chars += len(content)
    # Messages before the answers are equal on both sides, so checking chosen's is enough.
    if chosen[:-1] != rejected[:-1]:
        return -1
    for message in chosen:
        if type(message) is not dict or message.get("role") not in ROLES:
            return -1
        content = message.get("content")
        if type(content) is not str:
            return -1
        chars += len(content)
    answer = rejected[-1]
    if type(answer) is not dict:
        return -1
    content = answer.get("content")
    if type(content) is not str or not content or content.isspace():
        return -1
    if answer.get("role") != "assistant" or chosen[-1]["role"] != "assistant":
        return -1
    content = chosen[-1]["content"]
    if not content or content.isspace():
        return -1
    return chars + len(answer["content"])


def _diagnose_unparsable(line: bytes, error: orjson.JSONDecodeError) -> PreferencePairError:
    """Explain why orjson rejected a line, naming the field where possible.

    The line is decoded again with Python's json module, which accepts `NaN`, `Infinity` and
    lone surrogate escapes, so that a bad score can be reported under its own name.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as decode_error:
        return PreferencePairError(
            "",
            f"invalid UTF-8 at byte {decode_error.start + 1} of the line. Save the file as UTF-8",
        )
    try:
        obj = json.loads(text, parse_constant=_NonFiniteConstant)
    except json.JSONDecodeError as json_error:
        return PreferencePairError(
            "",
            f"not valid JSON: {json_error.msg} at column {json_error.colno}. Each line must be"
            " one complete JSON object",
        )
    except (ValueError, RecursionError) as other_error:
        return PreferencePairError("", f"not valid JSON: {other_error}")
    try:
        parse_pair(obj)
    except PreferencePairError as pair_error:
        return pair_error
    if "surrogate" in error.msg:
        return PreferencePairError(
            "",
            f"invalid string escape at column {error.colno}, because a lone UTF-16 surrogate"
            " such as \\ud800 is not a character. Remove it or add its other half",
        )
    return PreferencePairError(
        "",
        f"not valid JSON: {error.msg} at column {error.colno}. NaN, Infinity and numbers too"
        " large for a double are not allowed anywhere on a line",
    )


class _LineSplitter:
    """Split a byte stream into lines, dropping a leading BOM.

    A line longer than `max_line_bytes`, not counting its newline, comes out as None and its
    bytes are never kept.
    """

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._head = b""
        self._started = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._skipping = False

    def push(self, chunk: bytes) -> list[bytes | None]:
        """Return the lines that `chunk` completes, keeping its unfinished last line."""
        if not self._started:
            chunk = self._head + chunk
            if len(chunk) < len(BOM) and BOM.startswith(chunk):
                self._head = chunk
                return []
            self._started = True
            self._head = b""
            if chunk.startswith(BOM):
                chunk = chunk[len(BOM) :]

        lines: list[bytes | None] = chunk.split(b"\n")
        tail = lines.pop()
        if lines:
            longest_possible = len(chunk) + self._pending_bytes
            if self._skipping:
                lines[0] = None
                self._skipping = False
            elif self._pending:
                self._pending.append(lines[0])
                lines[0] = b"".join(self._pending)
                self._pending = []
            self._pending_bytes = 0
            if longest_possible > self.max_line_bytes:
                limit = self.max_line_bytes
                for index, line in enumerate(lines):
                    if line is not None and len(line) > limit:
                        lines[index] = None

        if tail and not self._skipping:
            self._pending_bytes += len(tail)
            if self._pending_bytes > self.max_line_bytes:
                self._skipping = True
                self._pending = []
                self._pending_bytes = 0
            else:
                self._pending.append(tail)
        return lines

    def close(self) -> list[bytes | None]:
        """Return the last line when the stream does not end with a newline."""
        lines: list[bytes | None] = []
        if not self._started:
            self._started = True
            lines = self.push(self._head)
        if self._skipping:
            lines.append(None)
        elif self._pending:
            lines.append(b"".join(self._pending))
        self._pending = []
        self._pending_bytes = 0
        self._skipping = False
        return lines


@dataclass(frozen=True, slots=True)
class LineProblem:
    """A rejected line of a preference file, with the reason.

    `field` is the JSON path of the bad value, or empty when the whole line is at fault.
    """

    line: int
    field: str
    message: str

    def describe(self) -> str:
        if self.field:
            return f"line {self.line}: {self.field}: {self.message}"
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of validating one preference file.

    `token_estimate` is ceil(char_count / 4), a rough estimate. About four characters per
    token is typical of English text with BPE tokenizers, but Chinese or Japanese text has
    fewer characters per token, so for it the estimate is low.
    """

    pair_count: int
    char_count: int
    token_estimate: int
    bad_line_count: int
    problems: list[LineProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.bad_line_count == 0 and self.pair_count > 0

    def describe(self) -> str:
        """Summarize why the file was rejected, listing the first bad lines.

        Returns an empty string for a valid file.
        """
        if self.ok:
            return ""
        if self.bad_line_count == 0:
            return (
                "Invalid preference file: it contains no preference pair (it is empty or has"
                ' only blank lines). Upload JSONL with one {"chosen": ..., "rejected": ...}'
                " object per line."
            )
        noun = "line" if self.bad_line_count == 1 else "lines"
        listed = "; ".join(problem.describe() for problem in self.problems)
        if len(self.problems) < self.bad_line_count:
            listed += f"; and {self.bad_line_count - len(self.problems)} more"
        return (
            f"Invalid preference file: {self.bad_line_count} bad {noun}. {listed}."
            " Fix these lines and upload the file again."
        )


class PreferenceFileValidator:
    """Validate a JSONL preference file fed in byte chunks of any size.

    Memory is bounded by `max_line_bytes` plus the chunk being fed. Only the first
    `max_listed` problems are kept, but `bad_line_count` counts them all. Each bad line is
    reported once, with its first problem.
    """

    def __init__(self, max_line_bytes: int, max_listed: int = 20) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_listed = max_listed
        self._splitter = _LineSplitter(max_line_bytes)
        self._line_number = 0
        self._pair_count = 0
        self._char_count = 0
        self._bad_line_count = 0
        self._problems: list[LineProblem] = []

    def feed(self, chunk: bytes) -> None:
        lines = self._splitter.push(chunk)
        if lines:
            self._check_lines(lines)

    def finish(self) -> ValidationReport:
        lines = self._splitter.close()
        if lines:
            self._check_lines(lines)
        return ValidationReport(
            pair_count=self._pair_count,
            char_count=self._char_count,
            token_estimate=-(-self._char_count // CHARS_PER_TOKEN),
            bad_line_count=self._bad_line_count,
            problems=list(self._problems),
        )

    def _check_lines(self, lines: list[bytes | None]) -> None:
        # This loop is the hot path of an upload, so it reads local names only and lets
        # orjson's error be the only test for blank and overlong lines.
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        count_plain = _count_plain_pair_chars
        line_number = self._line_number
        pair_count = 0
        char_count = 0

        for line in lines:
            line_number += 1
            try:
                obj = loads(line)
                chars = count_plain(obj)
                if chars < 0:
                    chars = parse_pair(obj).char_count
            except decode_error as error:
                # orjson raises JSONDecodeError for the None of an overlong line too.
                if line is None:
                    self._add_problem(line_number, "", self._too_long_message())
                elif not line.strip(_JSON_WHITESPACE):
                    pass
                elif len(self._problems) >= self.max_listed:
                    # Diagnosis parses the line again, so skip it for lines not listed.
                    self._bad_line_count += 1
                else:
                    problem = _diagnose_unparsable(line, error)
                    self._add_problem(line_number, problem.field, problem.message)
                continue
            except PreferencePairError as problem:
                self._add_problem(line_number, problem.field, problem.message)
                continue
            pair_count += 1
            char_count += chars

        self._line_number = line_number
        self._pair_count += pair_count
        self._char_count += char_count

    def _too_long_message(self) -> str:
        return (
            f"the line is longer than {self.max_line_bytes} bytes, the limit set by"
            " RUNDPO_MAX_LINE_BYTES. Shorten the conversation or raise the limit"
        )

    def _add_problem(self, line: int, field: str, message: str) -> None:
        self._bad_line_count += 1
        if len(self._problems) < self.max_listed:
            self._problems.append(LineProblem(line, field, message))


def validate_bytes(data: bytes, max_line_bytes: int, max_listed: int = 20) -> ValidationReport:
    """Validate a whole preference file held in memory."""
    validator = PreferenceFileValidator(max_line_bytes, max_listed)
    validator.feed(data)
    return validator.finish()


def iter_pairs(
    source: BinaryIO, max_line_bytes: int = 1 << 62
) -> Iterator[PreferencePair]:
    """Read a stored preference file and yield its pairs in order, skipping blank lines.

    Raises PreferenceFileError at the first line that is not a valid pair, which cannot
    happen for a file that `PreferenceFileValidator` accepted with the same `max_line_bytes`.
    """
    splitter = _LineSplitter(max_line_bytes)
    line_number = 0
    while True:
        chunk = source.read(READ_CHUNK_BYTES)
        lines = splitter.push(chunk) if chunk else splitter.close()
        for line in lines:
            line_number += 1
            if line is None:
                raise PreferenceFileError(
                    line_number, "", f"the line is longer than {max_line_bytes} bytes"
                )
            try:
                pair = parse_pair(orjson.loads(line))
            except orjson.JSONDecodeError as error:
                if not line.strip(_JSON_WHITESPACE):
                    continue
                problem = _diagnose_unparsable(line, error)
                raise PreferenceFileError(line_number, problem.field, problem.message) from None
            except PreferencePairError as problem:
                raise PreferenceFileError(line_number, problem.field, problem.message) from None
            yield pair
        if not chunk:
            return
